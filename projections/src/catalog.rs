//! Every projection by name: what the CLI, the daemon and the tests iterate
//! over, dispatching to the generic code per projector.

use std::fmt;

use sqlx::PgPool;

use crate::{
    replay::{Progress, ReplayError, ReplayOptions, ReplayReport, replay},
    views::{CouponProjector, OrderProjector, ProductProjector, Projector, VoucherProjector},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Projection {
    Orders,
    Coupons,
    Vouchers,
    Products,
}

impl Projection {
    pub const ALL: [Self; 4] = [Self::Orders, Self::Coupons, Self::Vouchers, Self::Products];

    /// The projection called `name` (`orders`, …), as ids and tables name it.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The projection whose daemon consumer is `consumer` (`projection-orders`, …).
    pub fn of_consumer(consumer: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|p| crate::daemon::consumer_name(p.name()) == consumer)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Orders => OrderProjector::NAME,
            Self::Coupons => CouponProjector::NAME,
            Self::Vouchers => VoucherProjector::NAME,
            Self::Products => ProductProjector::NAME,
        }
    }

    pub fn table(self) -> &'static str {
        match self {
            Self::Orders => OrderProjector::TABLE,
            Self::Coupons => CouponProjector::TABLE,
            Self::Vouchers => VoucherProjector::TABLE,
            Self::Products => ProductProjector::TABLE,
        }
    }

    pub fn aggregate_type(self) -> &'static str {
        match self {
            Self::Orders => OrderProjector::AGGREGATE_TYPE,
            Self::Coupons => CouponProjector::AGGREGATE_TYPE,
            Self::Vouchers => VoucherProjector::AGGREGATE_TYPE,
            Self::Products => ProductProjector::AGGREGATE_TYPE,
        }
    }

    pub async fn replay(
        self,
        pool: &PgPool,
        options: &ReplayOptions,
        progress: &mut dyn Progress,
    ) -> Result<ReplayReport, ReplayError> {
        match self {
            Self::Orders => replay::<OrderProjector>(pool, options, progress).await,
            Self::Coupons => replay::<CouponProjector>(pool, options, progress).await,
            Self::Vouchers => replay::<VoucherProjector>(pool, options, progress).await,
            Self::Products => replay::<ProductProjector>(pool, options, progress).await,
        }
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
