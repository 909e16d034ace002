//! Event metadata: who caused an event, within which flow, under which
//! trace. cqrs-es carries metadata as a `HashMap<String, String>` and stores
//! it with every event of a command, so [`EventMetadata`] converts to and
//! from that map under the stable [`keys`], and serializes as that same flat
//! map wherever it appears.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The map keys. Stored rows depend on them: never rename.
pub mod keys {
    pub const CORRELATION_ID: &str = "correlation_id";
    pub const CAUSATION_ID: &str = "causation_id";
    pub const ACTOR_KIND: &str = "actor_kind";
    pub const ACTOR_ID: &str = "actor_id";
    pub const ACTOR_ROLE: &str = "actor_role";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata key {0:?} is missing")]
    Missing(&'static str),
    #[error("metadata key {key:?} is not a UUID")]
    InvalidUuid {
        key: &'static str,
        #[source]
        source: uuid::Error,
    },
    #[error("unknown actor kind {0:?}")]
    UnknownActorKind(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// An authenticated user; `id` is the JWT `sub`.
    User,
    /// One of our own processes (reactor, timeout scheduler, edge).
    System,
    /// An external provider calling back, e.g. the payment webhook.
    Provider,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::System => "system",
            Self::Provider => "provider",
        }
    }

    fn parse(s: &str) -> Result<Self, MetadataError> {
        match s {
            "user" => Ok(Self::User),
            "system" => Ok(Self::System),
            "provider" => Ok(Self::Provider),
            other => Err(MetadataError::UnknownActorKind(other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: ActorKind,
    pub id: String,
    /// The JWT role for users; `None` for system and provider actors.
    pub role: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HashMap<String, String>", into = "HashMap<String, String>")]
pub struct EventMetadata {
    /// Shared by every event of one business flow (e.g. one order's saga).
    pub correlation_id: Uuid,
    /// The event that led to this command; `None` for commands from outside.
    pub causation_id: Option<Uuid>,
    pub actor: Actor,
    /// W3C trace context, so consumers continue the producer's trace.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl EventMetadata {
    /// Metadata for a new flow started by `actor`.
    pub fn new(actor: Actor) -> Self {
        Self {
            // v7 ids sort by creation time, which helps when browsing logs.
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            actor,
            traceparent: None,
            tracestate: None,
        }
    }

    /// A new flow started by one of our own processes, named `name`.
    pub fn system(name: impl Into<String>) -> Self {
        Self::new(Actor {
            kind: ActorKind::System,
            id: name.into(),
            role: None,
        })
    }

    /// A new flow started by the user `sub` acting as `role`.
    pub fn for_user(sub: impl Into<String>, role: impl Into<String>) -> Self {
        Self::new(Actor {
            kind: ActorKind::User,
            id: sub.into(),
            role: Some(role.into()),
        })
    }

    /// The same flow, continued because of the event `event_id`.
    pub fn caused_by(mut self, event_id: Uuid) -> Self {
        self.causation_id = Some(event_id);
        self
    }

    pub fn with_trace(mut self, traceparent: impl Into<String>, tracestate: Option<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self.tracestate = tracestate;
        self
    }

    /// The map handed to cqrs-es `execute_with_metadata`. Absent optional
    /// values are left out rather than stored as empty strings.
    pub fn to_map(&self) -> HashMap<String, String> {
        let optional = [
            (keys::CAUSATION_ID, self.causation_id.map(|id| id.to_string())),
            (keys::ACTOR_ROLE, self.actor.role.clone()),
            (keys::TRACEPARENT, self.traceparent.clone()),
            (keys::TRACESTATE, self.tracestate.clone()),
        ];
        [
            (keys::CORRELATION_ID, Some(self.correlation_id.to_string())),
            (keys::ACTOR_KIND, Some(self.actor.kind.as_str().to_owned())),
            (keys::ACTOR_ID, Some(self.actor.id.clone())),
        ]
        .into_iter()
        .chain(optional)
        .filter_map(|(key, value)| Some((key.to_owned(), value?)))
        .collect()
    }

    /// Reads a stored map; unknown keys are ignored so newer writers can add
    /// keys without breaking older readers.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, MetadataError> {
        let required = |key: &'static str| map.get(key).ok_or(MetadataError::Missing(key));
        let uuid = |key: &'static str, value: &str| {
            Uuid::parse_str(value).map_err(|source| MetadataError::InvalidUuid { key, source })
        };
        Ok(Self {
            correlation_id: uuid(keys::CORRELATION_ID, required(keys::CORRELATION_ID)?)?,
            causation_id: map
                .get(keys::CAUSATION_ID)
                .map(|value| uuid(keys::CAUSATION_ID, value))
                .transpose()?,
            actor: Actor {
                kind: ActorKind::parse(required(keys::ACTOR_KIND)?)?,
                id: required(keys::ACTOR_ID)?.clone(),
                role: map.get(keys::ACTOR_ROLE).cloned(),
            },
            traceparent: map.get(keys::TRACEPARENT).cloned(),
            tracestate: map.get(keys::TRACESTATE).cloned(),
        })
    }
}

impl TryFrom<HashMap<String, String>> for EventMetadata {
    type Error = MetadataError;

    fn try_from(map: HashMap<String, String>) -> Result<Self, Self::Error> {
        Self::from_map(&map)
    }
}

impl From<EventMetadata> for HashMap<String, String> {
    fn from(metadata: EventMetadata) -> Self {
        metadata.to_map()
    }
}
