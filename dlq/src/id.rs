//! One id scheme over every place dead letters are parked:
//! `events:<sequence in the dead-letter stream>`,
//! `projections:<projection>:<event id>`, `edge:<voucher id>:<entry id>`,
//! `timeouts:<order id>`.

use std::{fmt, str::FromStr};

use projections::Projection;
use serde::Serialize;
use uuid::Uuid;

/// Where a dead letter is parked; `--source` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The JetStream dead-letter stream (every consumer and reactor).
    Events,
    /// `projection_dead_letters`: events a projector refused.
    Projections,
    /// The edge's Redis `:dead` streams: entries the forwarder could not read.
    Edge,
    /// `order_deadlines` set aside: payment timeouts that could not fire.
    Timeouts,
}

impl Source {
    pub const ALL: [Self; 4] = [Self::Events, Self::Projections, Self::Edge, Self::Timeouts];

    pub fn name(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Projections => "projections",
            Self::Edge => "edge",
            Self::Timeouts => "timeouts",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryId {
    Events { sequence: u64 },
    Projections { projection: Projection, event_id: Uuid },
    Edge { voucher_id: Uuid, entry_id: String },
    Timeouts { order_id: Uuid },
}

impl EntryId {
    pub fn source(&self) -> Source {
        match self {
            Self::Events { .. } => Source::Events,
            Self::Projections { .. } => Source::Projections,
            Self::Edge { .. } => Source::Edge,
            Self::Timeouts { .. } => Source::Timeouts,
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Events { sequence } => write!(f, "events:{sequence}"),
            Self::Projections { projection, event_id } => write!(f, "projections:{projection}:{event_id}"),
            Self::Edge { voucher_id, entry_id } => write!(f, "edge:{voucher_id}:{entry_id}"),
            Self::Timeouts { order_id } => write!(f, "timeouts:{order_id}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "{0:?} is not a dead-letter id: expected events:<sequence>, projections:<projection>:<event id>, edge:<voucher id>:<entry id> or timeouts:<order id>"
    )]
    Shape(String),
    #[error("{0:?}: unknown projection (orders, coupons, vouchers, products)")]
    Projection(String),
}

impl FromStr for EntryId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, IdError> {
        let shape = || IdError::Shape(text.chars().take(120).collect());
        let (source, rest) = text.split_once(':').ok_or_else(shape)?;
        match source {
            "events" => {
                let sequence: u64 = rest.parse().map_err(|_| shape())?;
                if sequence == 0 {
                    return Err(shape());
                }
                Ok(Self::Events { sequence })
            }
            "projections" => {
                let (name, event_id) = rest.split_once(':').ok_or_else(shape)?;
                let projection =
                    Projection::named(name).ok_or_else(|| IdError::Projection(name.chars().take(40).collect()))?;
                let event_id = event_id.parse().map_err(|_| shape())?;
                Ok(Self::Projections { projection, event_id })
            }
            "edge" => {
                let (voucher_id, entry_id) = rest.split_once(':').ok_or_else(shape)?;
                let voucher_id = voucher_id.parse().map_err(|_| shape())?;
                // a Redis stream id: <ms>-<seq>
                let (ms, seq) = entry_id.split_once('-').ok_or_else(shape)?;
                if ms.parse::<u64>().is_err() || seq.parse::<u64>().is_err() {
                    return Err(shape());
                }
                Ok(Self::Edge {
                    voucher_id,
                    entry_id: entry_id.to_owned(),
                })
            }
            "timeouts" => Ok(Self::Timeouts {
                order_id: rest.parse().map_err(|_| shape())?,
            }),
            _ => Err(shape()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_reads_back_as_it_was_written() {
        for id in [
            EntryId::Events { sequence: 42 },
            EntryId::Projections {
                projection: Projection::Orders,
                event_id: Uuid::from_u128(7),
            },
            EntryId::Edge {
                voucher_id: Uuid::from_u128(9),
                entry_id: "1700000000000-3".to_owned(),
            },
            EntryId::Timeouts {
                order_id: Uuid::from_u128(11),
            },
        ] {
            assert_eq!(id.to_string().parse::<EntryId>(), Ok(id));
        }
    }

    #[test]
    fn malformed_ids_are_refused_with_the_expected_shapes() {
        for bad in [
            "",
            "42",
            "events:",
            "events:0",
            "events:-1",
            "events:x",
            "projections:orders",
            "projections:orders:not-a-uuid",
            "edge:00000000-0000-0000-0000-000000000009",
            "edge:00000000-0000-0000-0000-000000000009:abc",
            "edge:nope:1-0",
            "jetstream:4",
            "timeouts:",
            "timeouts:42",
        ] {
            assert!(matches!(bad.parse::<EntryId>(), Err(IdError::Shape(_))), "{bad}");
        }
        assert_eq!(
            "projections:invoices:00000000-0000-0000-0000-000000000001".parse::<EntryId>(),
            Err(IdError::Projection("invoices".to_owned()))
        );
    }
}
