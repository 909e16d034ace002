//! The Voucher aggregate: a merchant's voucher and, for seckill vouchers, the
//! final guard behind the edge's Redis gate.
//!
//! Rules it enforces:
//! - Creation: a non-blank title of at most 200 characters, non-negative
//!   price and minimum spend, a positive value, a window that ends after it
//!   begins; seckill vouchers have a stock of 1..=10,000,000, regular ones
//!   none (they are unlimited).
//! - Regular claims: within the window by the service clock (begins
//!   inclusive, ends exclusive), one per user.
//! - Seckill claims arrive in batches from the single writer per voucher and
//!   are decided in order; every admitted request ends as exactly one
//!   decision, accepted or rejected, recorded as an event so a redelivered
//!   request (same order id) gets no second one. The window is judged at the
//!   time the edge admitted the request. No oversell: accepted − released
//!   never exceeds the stock. One order per user whatever becomes of it: a
//!   released unit returns to the sale, its buyer's right to buy does not.
//! - Releasing stock happens once per accepted order.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use events::{AggregateEvents, ClaimRejection, OrderRequested, VoucherEvent, VoucherKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{DomainError, ErrorKind};
use platform::clock::{SharedClock, SystemClock};

pub const MAX_TITLE_CHARS: usize = super::limits::MAX_TEXT_CHARS;
pub const MAX_SECKILL_STOCK: u32 = super::limits::MAX_QUANTITY;

#[derive(Debug, Clone)]
pub struct VoucherServices {
    pub clock: SharedClock,
}

impl VoucherServices {
    pub fn new(clock: SharedClock) -> Self {
        Self { clock }
    }
}

impl Default for VoucherServices {
    fn default() -> Self {
        Self::new(std::sync::Arc::new(SystemClock))
    }
}

/// One admitted seckill request, as the edge recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeckillClaim {
    pub order_id: Uuid,
    pub user_id: String,
    /// When the edge admitted it; the sale window is judged at this time,
    /// not when the batch happens to be processed.
    pub requested_at: DateTime<Utc>,
}

impl From<OrderRequested> for SeckillClaim {
    fn from(request: OrderRequested) -> Self {
        Self {
            order_id: request.order_id,
            user_id: request.user_id,
            requested_at: request.requested_at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoucherCommand {
    Create {
        voucher_id: Uuid,
        merchant_id: String,
        title: String,
        kind: VoucherKind,
        price_cents: i64,
        value_cents: i64,
        min_spend_cents: i64,
        stock: Option<u32>,
        begins_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
    },
    /// Claim a regular voucher. Repeating it with the same coupon id succeeds
    /// with no events, so a retried request does not read as a second claim.
    ClaimRegular { user_id: String, coupon_id: Uuid },
    /// The batched final guard; fails as a whole only when the voucher does
    /// not exist, otherwise decides every not yet decided claim.
    ProcessSeckillClaims { claims: Vec<SeckillClaim> },
    /// Give an accepted order's unit back; once per order, repeats are no-ops.
    ReleaseSeckillStock { order_id: Uuid },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoucherError {
    #[error("voucher not found")]
    NotFound,
    #[error("voucher already exists")]
    AlreadyExists,
    #[error("title must not be blank")]
    EmptyTitle,
    #[error("title must be at most {MAX_TITLE_CHARS} characters")]
    TitleTooLong,
    #[error("title must not contain control characters")]
    TitleNotText,
    #[error("price_cents must not be negative")]
    NegativePrice,
    #[error("amounts must be at most {} cents", super::limits::MAX_CENTS)]
    AmountTooHigh,
    #[error("min_spend_cents must not be negative")]
    NegativeMinSpend,
    #[error("value_cents must be positive")]
    NonPositiveValue,
    #[error("a seckill voucher needs a stock")]
    StockRequired,
    #[error("stock must be between 1 and {MAX_SECKILL_STOCK}")]
    StockOutOfRange,
    #[error("a regular voucher has no stock")]
    StockNotAllowed,
    #[error("ends_at must be after begins_at")]
    InvalidWindow,
    #[error("seckill vouchers are claimed through the flash sale")]
    NotRegular,
    #[error("the sale has not started")]
    SaleNotStarted,
    #[error("the sale has ended")]
    SaleEnded,
    #[error("this user already claimed this voucher")]
    AlreadyClaimed,
    #[error("no accepted claim for this order")]
    ClaimNotFound,
}

impl DomainError for VoucherError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound | Self::ClaimNotFound => ErrorKind::NotFound,
            Self::AlreadyExists | Self::NotRegular | Self::AlreadyClaimed => ErrorKind::Conflict,
            // The same answer the edge gives for a seckill voucher's window.
            Self::SaleNotStarted | Self::SaleEnded => ErrorKind::Forbidden,
            Self::EmptyTitle
            | Self::TitleTooLong
            | Self::TitleNotText
            | Self::AmountTooHigh
            | Self::NegativePrice
            | Self::NegativeMinSpend
            | Self::NonPositiveValue
            | Self::StockRequired
            | Self::StockOutOfRange
            | Self::StockNotAllowed
            | Self::InvalidWindow => ErrorKind::Invalid,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "voucher_not_found",
            Self::AlreadyExists => "voucher_exists",
            Self::EmptyTitle => "title_empty",
            Self::TitleTooLong => "title_too_long",
            Self::TitleNotText => "title_not_text",
            Self::AmountTooHigh => "amount_too_high",
            Self::NegativePrice => "negative_price",
            Self::NegativeMinSpend => "negative_min_spend",
            Self::NonPositiveValue => "non_positive_value",
            Self::StockRequired => "stock_required",
            Self::StockOutOfRange => "stock_out_of_range",
            Self::StockNotAllowed => "stock_not_allowed",
            Self::InvalidWindow => "invalid_sale_window",
            Self::NotRegular => "voucher_not_regular",
            Self::SaleNotStarted => "sale_not_started",
            Self::SaleEnded => "sale_ended",
            Self::AlreadyClaimed => "already_claimed",
            Self::ClaimNotFound => "claim_not_found",
        }
    }
}

/// What `VoucherCreated` fixed about the voucher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoucherDetails {
    pub voucher_id: Uuid,
    pub merchant_id: String,
    pub title: String,
    pub kind: VoucherKind,
    pub price_cents: i64,
    pub value_cents: i64,
    pub min_spend_cents: i64,
    pub stock: Option<u32>,
    pub begins_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

impl From<VoucherDetails> for VoucherEvent {
    fn from(details: VoucherDetails) -> Self {
        Self::VoucherCreated {
            voucher_id: details.voucher_id,
            merchant_id: details.merchant_id,
            title: details.title,
            kind: details.kind,
            price_cents: details.price_cents,
            value_cents: details.value_cents,
            min_spend_cents: details.min_spend_cents,
            stock: details.stock,
            begins_at: details.begins_at,
            ends_at: details.ends_at,
        }
    }
}

/// The final guard's answer for one order id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Stays `Accepted` after the unit is released: the order existed.
    Accepted {
        user_id: String,
    },
    Rejected(ClaimRejection),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Voucher {
    details: Option<VoucherDetails>,
    /// order id → buyer, for every accepted seckill claim.
    accepted: HashMap<Uuid, String>,
    /// Always a subset of `accepted`, so `accepted − released` is the stock held.
    released: HashSet<Uuid>,
    rejected: HashMap<Uuid, ClaimRejection>,
    /// Users with an accepted claim; never shrinks (one order per user).
    buyers: HashSet<String>,
    /// user → the coupon their regular claim issued.
    regular_claims: HashMap<String, Uuid>,
}

impl Voucher {
    pub fn exists(&self) -> bool {
        self.details.is_some()
    }

    pub fn details(&self) -> Option<&VoucherDetails> {
        self.details.as_ref()
    }

    pub fn kind(&self) -> Option<VoucherKind> {
        self.details.as_ref().map(|d| d.kind)
    }

    pub fn title(&self) -> Option<&str> {
        self.details.as_ref().map(|d| d.title.as_str())
    }

    pub fn merchant_id(&self) -> Option<&str> {
        self.details.as_ref().map(|d| d.merchant_id.as_str())
    }

    pub fn price_cents(&self) -> Option<i64> {
        self.details.as_ref().map(|d| d.price_cents)
    }

    pub fn value_cents(&self) -> Option<i64> {
        self.details.as_ref().map(|d| d.value_cents)
    }

    pub fn min_spend_cents(&self) -> Option<i64> {
        self.details.as_ref().map(|d| d.min_spend_cents)
    }

    pub fn begins_at(&self) -> Option<DateTime<Utc>> {
        self.details.as_ref().map(|d| d.begins_at)
    }

    pub fn ends_at(&self) -> Option<DateTime<Utc>> {
        self.details.as_ref().map(|d| d.ends_at)
    }

    /// The seckill stock; `None` for regular vouchers and before creation.
    pub fn stock(&self) -> Option<u32> {
        self.details.as_ref().and_then(|d| d.stock)
    }

    /// Units currently held by orders (accepted − released) for a seckill
    /// voucher, so `claimed() + remaining() == stock`; the number of claims
    /// for a regular voucher.
    pub fn claimed(&self) -> u32 {
        match self.kind() {
            Some(VoucherKind::Regular) => saturating_u32(self.regular_claims.len()),
            _ => self.held(),
        }
    }

    /// Units still for sale (stock − accepted + released). Regular vouchers
    /// have no stock and answer 0: check [`Voucher::stock`] to tell them apart.
    pub fn remaining(&self) -> u32 {
        self.stock().unwrap_or(0).saturating_sub(self.held())
    }

    /// Every claim ever accepted, released or not.
    pub fn accepted_count(&self) -> u32 {
        saturating_u32(self.accepted.len())
    }

    pub fn released_count(&self) -> u32 {
        saturating_u32(self.released.len())
    }

    pub fn rejected_count(&self) -> u32 {
        saturating_u32(self.rejected.len())
    }

    pub fn decision(&self, order_id: Uuid) -> Option<Decision> {
        if let Some(user_id) = self.accepted.get(&order_id) {
            return Some(Decision::Accepted {
                user_id: user_id.clone(),
            });
        }
        self.rejected.get(&order_id).map(|reason| Decision::Rejected(*reason))
    }

    pub fn is_released(&self, order_id: Uuid) -> bool {
        self.released.contains(&order_id)
    }

    /// Whether the user ever had a seckill claim accepted.
    pub fn has_purchased(&self, user_id: &str) -> bool {
        self.buyers.contains(user_id)
    }

    /// The coupon a user's regular claim issued, if they claimed.
    pub fn regular_coupon(&self, user_id: &str) -> Option<Uuid> {
        self.regular_claims.get(user_id).copied()
    }

    fn held(&self) -> u32 {
        saturating_u32(self.accepted.len().saturating_sub(self.released.len()))
    }

    fn decide_create(&self, details: VoucherDetails) -> Result<VoucherEvent, VoucherError> {
        if self.exists() {
            return Err(VoucherError::AlreadyExists);
        }
        if details.title.trim().is_empty() {
            return Err(VoucherError::EmptyTitle);
        }
        if details.title.chars().count() > MAX_TITLE_CHARS {
            return Err(VoucherError::TitleTooLong);
        }
        if !super::limits::is_clean_text(&details.title) {
            return Err(VoucherError::TitleNotText);
        }
        if details.price_cents < 0 {
            return Err(VoucherError::NegativePrice);
        }
        if [details.price_cents, details.value_cents, details.min_spend_cents]
            .iter()
            .any(|cents| *cents > super::limits::MAX_CENTS)
        {
            return Err(VoucherError::AmountTooHigh);
        }
        if details.min_spend_cents < 0 {
            return Err(VoucherError::NegativeMinSpend);
        }
        if details.value_cents <= 0 {
            return Err(VoucherError::NonPositiveValue);
        }
        match (details.kind, details.stock) {
            (VoucherKind::Seckill, None) => return Err(VoucherError::StockRequired),
            (VoucherKind::Seckill, Some(stock)) if stock == 0 || stock > MAX_SECKILL_STOCK => {
                return Err(VoucherError::StockOutOfRange);
            }
            (VoucherKind::Regular, Some(_)) => return Err(VoucherError::StockNotAllowed),
            _ => {}
        }
        if details.ends_at <= details.begins_at {
            return Err(VoucherError::InvalidWindow);
        }
        Ok(details.into())
    }

    fn decide_claim_regular(
        &self,
        user_id: String,
        coupon_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<VoucherEvent>, VoucherError> {
        let details = self.details.as_ref().ok_or(VoucherError::NotFound)?;
        if details.kind != VoucherKind::Regular {
            return Err(VoucherError::NotRegular);
        }
        // Before the window check: a retry that arrives after the sale ended
        // must still see its own claim as done.
        match self.regular_claims.get(&user_id) {
            Some(existing) if *existing == coupon_id => return Ok(None),
            Some(_) => return Err(VoucherError::AlreadyClaimed),
            None => {}
        }
        if now < details.begins_at {
            return Err(VoucherError::SaleNotStarted);
        }
        if now >= details.ends_at {
            return Err(VoucherError::SaleEnded);
        }
        Ok(Some(VoucherEvent::VoucherClaimed { user_id, coupon_id }))
    }

    /// `None` for an order id already decided: a redelivery gets nothing new.
    fn decide_seckill_claim(&self, claim: SeckillClaim) -> Option<VoucherEvent> {
        if self.accepted.contains_key(&claim.order_id) || self.rejected.contains_key(&claim.order_id) {
            return None;
        }
        let details = self.details.as_ref()?;
        if !super::limits::is_valid_user_id(&claim.user_id) {
            // Admitted at the edge but unstorable as it is: refused with a
            // user id the store can hold, so it still ends as one order and
            // the edge gives the unit back.
            return Some(VoucherEvent::SeckillClaimRejected {
                order_id: claim.order_id,
                user_id: super::limits::storable_user_id(&claim.user_id),
                reason: ClaimRejection::InvalidRequest,
            });
        }
        let rejection = if details.kind != VoucherKind::Seckill {
            Some(ClaimRejection::NotSeckill)
        } else if claim.requested_at < details.begins_at {
            Some(ClaimRejection::SaleNotStarted)
        } else if claim.requested_at >= details.ends_at {
            Some(ClaimRejection::SaleEnded)
        } else if self.buyers.contains(&claim.user_id) {
            Some(ClaimRejection::AlreadyPurchased)
        } else if self.remaining() == 0 {
            Some(ClaimRejection::SoldOut)
        } else {
            None
        };
        Some(match rejection {
            Some(reason) => VoucherEvent::SeckillClaimRejected {
                order_id: claim.order_id,
                user_id: claim.user_id,
                reason,
            },
            None => VoucherEvent::SeckillClaimAccepted {
                order_id: claim.order_id,
                user_id: claim.user_id,
                requested_at: claim.requested_at,
            },
        })
    }

    fn decide_release(&self, order_id: Uuid) -> Result<Option<VoucherEvent>, VoucherError> {
        if !self.exists() {
            return Err(VoucherError::NotFound);
        }
        let user_id = self.accepted.get(&order_id).ok_or(VoucherError::ClaimNotFound)?;
        if self.released.contains(&order_id) {
            return Ok(None);
        }
        Ok(Some(VoucherEvent::SeckillStockReleased {
            order_id,
            user_id: user_id.clone(),
        }))
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Aggregate for Voucher {
    const TYPE: &'static str = VoucherEvent::AGGREGATE_TYPE;
    type Command = VoucherCommand;
    type Event = VoucherEvent;
    type Error = VoucherError;
    type Services = VoucherServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            VoucherCommand::Create {
                voucher_id,
                merchant_id,
                title,
                kind,
                price_cents,
                value_cents,
                min_spend_cents,
                stock,
                begins_at,
                ends_at,
            } => {
                let event = self.decide_create(VoucherDetails {
                    voucher_id,
                    merchant_id,
                    title,
                    kind,
                    price_cents,
                    value_cents,
                    min_spend_cents,
                    stock,
                    begins_at,
                    ends_at,
                })?;
                sink.write(event, self).await;
            }
            VoucherCommand::ClaimRegular { user_id, coupon_id } => {
                if let Some(event) = self.decide_claim_regular(user_id, coupon_id, services.clock.now())? {
                    sink.write(event, self).await;
                }
            }
            VoucherCommand::ProcessSeckillClaims { claims } => {
                // The only failure of the whole batch, checked before any write.
                if !self.exists() {
                    return Err(VoucherError::NotFound);
                }
                // Each decision is applied before the next claim is judged, so
                // duplicates and stock inside one batch behave as if the claims
                // had come one by one.
                for claim in claims {
                    if let Some(event) = self.decide_seckill_claim(claim) {
                        sink.write(event, self).await;
                    }
                }
            }
            VoucherCommand::ReleaseSeckillStock { order_id } => {
                if let Some(event) = self.decide_release(order_id)? {
                    sink.write(event, self).await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            VoucherEvent::VoucherCreated {
                voucher_id,
                merchant_id,
                title,
                kind,
                price_cents,
                value_cents,
                min_spend_cents,
                stock,
                begins_at,
                ends_at,
            } => {
                self.details = Some(VoucherDetails {
                    voucher_id,
                    merchant_id,
                    title,
                    kind,
                    price_cents,
                    value_cents,
                    min_spend_cents,
                    stock,
                    begins_at,
                    ends_at,
                });
            }
            VoucherEvent::VoucherClaimed { user_id, coupon_id } => {
                self.regular_claims.entry(user_id).or_insert(coupon_id);
            }
            VoucherEvent::SeckillClaimAccepted { order_id, user_id, .. } => {
                self.buyers.insert(user_id.clone());
                self.accepted.entry(order_id).or_insert(user_id);
            }
            VoucherEvent::SeckillClaimRejected { order_id, reason, .. } => {
                self.rejected.entry(order_id).or_insert(reason);
            }
            VoucherEvent::SeckillStockReleased { order_id, .. } => {
                // A release of an order never accepted would inflate the stock.
                if self.accepted.contains_key(&order_id) {
                    self.released.insert(order_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use chrono::Duration;
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::domain::testing::{at_secs, execute, id, replay, t0};
    use platform::clock::FixedClock;

    const HOUR: i64 = 3600;

    fn voucher_id() -> Uuid {
        id(0xF00D)
    }

    fn begins() -> DateTime<Utc> {
        t0()
    }

    fn ends() -> DateTime<Utc> {
        at_secs(2 * HOUR)
    }

    fn during() -> DateTime<Utc> {
        at_secs(HOUR)
    }

    fn services_at(now: DateTime<Utc>) -> VoucherServices {
        VoucherServices::new(Arc::new(FixedClock(now)))
    }

    fn framework_at(now: DateTime<Utc>) -> TestFramework<Voucher> {
        TestFramework::with(services_at(now))
    }

    fn framework() -> TestFramework<Voucher> {
        framework_at(during())
    }

    fn create(kind: VoucherKind, stock: Option<u32>) -> VoucherCommand {
        VoucherCommand::Create {
            voucher_id: voucher_id(),
            merchant_id: "merchant-1".into(),
            title: "Two coffees for one".into(),
            kind,
            price_cents: 990,
            value_cents: 1500,
            min_spend_cents: 3000,
            stock,
            begins_at: begins(),
            ends_at: ends(),
        }
    }

    fn created(kind: VoucherKind, stock: Option<u32>) -> VoucherEvent {
        VoucherEvent::VoucherCreated {
            voucher_id: voucher_id(),
            merchant_id: "merchant-1".into(),
            title: "Two coffees for one".into(),
            kind,
            price_cents: 990,
            value_cents: 1500,
            min_spend_cents: 3000,
            stock,
            begins_at: begins(),
            ends_at: ends(),
        }
    }

    fn seckill_created(stock: u32) -> VoucherEvent {
        created(VoucherKind::Seckill, Some(stock))
    }

    fn regular_created() -> VoucherEvent {
        created(VoucherKind::Regular, None)
    }

    fn with_create(command: VoucherCommand, edit: impl FnOnce(&mut VoucherCommand)) -> VoucherCommand {
        let mut command = command;
        edit(&mut command);
        command
    }

    fn claim(order: u128, user: &str, requested_at: DateTime<Utc>) -> SeckillClaim {
        SeckillClaim {
            order_id: id(order),
            user_id: user.into(),
            requested_at,
        }
    }

    fn batch(claims: Vec<SeckillClaim>) -> VoucherCommand {
        VoucherCommand::ProcessSeckillClaims { claims }
    }

    fn accepted(order: u128, user: &str, requested_at: DateTime<Utc>) -> VoucherEvent {
        VoucherEvent::SeckillClaimAccepted {
            order_id: id(order),
            user_id: user.into(),
            requested_at,
        }
    }

    fn rejected(order: u128, user: &str, reason: ClaimRejection) -> VoucherEvent {
        VoucherEvent::SeckillClaimRejected {
            order_id: id(order),
            user_id: user.into(),
            reason,
        }
    }

    fn released(order: u128, user: &str) -> VoucherEvent {
        VoucherEvent::SeckillStockReleased {
            order_id: id(order),
            user_id: user.into(),
        }
    }

    // ---- Create ----

    #[test]
    fn create_seckill_voucher() {
        framework()
            .given_no_previous_events()
            .when(create(VoucherKind::Seckill, Some(100)))
            .then_expect_events(vec![seckill_created(100)]);
    }

    #[test]
    fn create_regular_voucher() {
        framework()
            .given_no_previous_events()
            .when(create(VoucherKind::Regular, None))
            .then_expect_events(vec![regular_created()]);
    }

    #[test]
    fn create_accepts_the_limits() {
        let command = with_create(create(VoucherKind::Seckill, Some(MAX_SECKILL_STOCK)), |c| {
            if let VoucherCommand::Create {
                title,
                price_cents,
                min_spend_cents,
                ..
            } = c
            {
                *title = "é".repeat(MAX_TITLE_CHARS);
                *price_cents = 0;
                *min_spend_cents = 0;
            }
        });
        let events = execute(&mut Voucher::default(), command, &services_at(during())).unwrap();
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn create_twice_is_a_conflict() {
        framework()
            .given(vec![seckill_created(100)])
            .when(create(VoucherKind::Seckill, Some(100)))
            .then_expect_error(VoucherError::AlreadyExists);
    }

    fn create_fails(
        edit: impl FnOnce(&mut VoucherCommand),
        kind: VoucherKind,
        stock: Option<u32>,
        error: VoucherError,
    ) {
        framework()
            .given_no_previous_events()
            .when(with_create(create(kind, stock), edit))
            .then_expect_error(error);
    }

    fn edit_title(title: &str) -> impl FnOnce(&mut VoucherCommand) + '_ {
        move |c| {
            if let VoucherCommand::Create { title: t, .. } = c {
                *t = title.to_owned();
            }
        }
    }

    #[test]
    fn create_rejects_an_empty_title() {
        create_fails(edit_title(""), VoucherKind::Regular, None, VoucherError::EmptyTitle);
    }

    #[test]
    fn create_rejects_a_blank_title() {
        create_fails(edit_title("  \t"), VoucherKind::Regular, None, VoucherError::EmptyTitle);
    }

    #[test]
    fn create_rejects_a_title_over_200_characters() {
        let title = "x".repeat(MAX_TITLE_CHARS + 1);
        create_fails(
            edit_title(&title),
            VoucherKind::Regular,
            None,
            VoucherError::TitleTooLong,
        );
    }

    #[test]
    fn create_rejects_control_characters_in_the_title() {
        for title in ["Hot\0pot", "Hot\npot", "\u{7f}"] {
            create_fails(
                edit_title(title),
                VoucherKind::Regular,
                None,
                VoucherError::TitleNotText,
            );
        }
    }

    #[test]
    fn create_rejects_amounts_over_the_limit() {
        let over = crate::domain::limits::MAX_CENTS + 1;
        for field in 0..3 {
            let edit = move |c: &mut VoucherCommand| {
                if let VoucherCommand::Create {
                    price_cents,
                    value_cents,
                    min_spend_cents,
                    ..
                } = c
                {
                    *[price_cents, value_cents, min_spend_cents][field] = over;
                }
            };
            create_fails(edit, VoucherKind::Regular, None, VoucherError::AmountTooHigh);
        }
    }

    #[test]
    fn an_unstorable_user_id_is_refused_with_a_storable_one() {
        let mut voucher = replay::<Voucher>([seckill_created(2)]);
        let events = execute(
            &mut voucher,
            batch(vec![
                claim(1, "ann\0", during()),
                claim(2, "", during()),
                claim(3, "bob", during()),
            ]),
            &services_at(during()),
        )
        .unwrap();
        assert_eq!(
            events,
            vec![
                rejected(1, "ann\u{fffd}", ClaimRejection::InvalidRequest),
                rejected(2, "\u{fffd}", ClaimRejection::InvalidRequest),
                accepted(3, "bob", during()),
            ]
        );
        // the refused claims took no unit
        assert_eq!(voucher.remaining(), 1);
    }

    #[test]
    fn create_rejects_a_negative_price() {
        let edit = |c: &mut VoucherCommand| {
            if let VoucherCommand::Create { price_cents, .. } = c {
                *price_cents = -1;
            }
        };
        create_fails(edit, VoucherKind::Regular, None, VoucherError::NegativePrice);
    }

    #[test]
    fn create_rejects_a_negative_min_spend() {
        let edit = |c: &mut VoucherCommand| {
            if let VoucherCommand::Create { min_spend_cents, .. } = c {
                *min_spend_cents = -1;
            }
        };
        create_fails(edit, VoucherKind::Regular, None, VoucherError::NegativeMinSpend);
    }

    #[test]
    fn create_rejects_a_zero_or_negative_value() {
        for value in [0, -5] {
            let edit = move |c: &mut VoucherCommand| {
                if let VoucherCommand::Create { value_cents, .. } = c {
                    *value_cents = value;
                }
            };
            create_fails(edit, VoucherKind::Regular, None, VoucherError::NonPositiveValue);
        }
    }

    #[test]
    fn create_rejects_a_seckill_voucher_without_stock() {
        create_fails(|_| {}, VoucherKind::Seckill, None, VoucherError::StockRequired);
    }

    #[test]
    fn create_rejects_a_seckill_stock_out_of_range() {
        for stock in [0, MAX_SECKILL_STOCK + 1] {
            create_fails(|_| {}, VoucherKind::Seckill, Some(stock), VoucherError::StockOutOfRange);
        }
    }

    #[test]
    fn create_rejects_a_regular_voucher_with_stock() {
        create_fails(|_| {}, VoucherKind::Regular, Some(10), VoucherError::StockNotAllowed);
    }

    #[test]
    fn create_rejects_a_window_that_does_not_end_after_it_begins() {
        for end in [begins(), begins() - Duration::seconds(1)] {
            let edit = move |c: &mut VoucherCommand| {
                if let VoucherCommand::Create { ends_at, .. } = c {
                    *ends_at = end;
                }
            };
            create_fails(edit, VoucherKind::Seckill, Some(5), VoucherError::InvalidWindow);
        }
    }

    // ---- ClaimRegular ----

    fn claim_regular(user: &str, coupon: u128) -> VoucherCommand {
        VoucherCommand::ClaimRegular {
            user_id: user.into(),
            coupon_id: id(coupon),
        }
    }

    fn claimed_regular(user: &str, coupon: u128) -> VoucherEvent {
        VoucherEvent::VoucherClaimed {
            user_id: user.into(),
            coupon_id: id(coupon),
        }
    }

    #[test]
    fn claim_regular_issues_a_claim() {
        framework()
            .given(vec![regular_created()])
            .when(claim_regular("alice", 7))
            .then_expect_events(vec![claimed_regular("alice", 7)]);
    }

    #[test]
    fn claim_regular_of_a_missing_voucher_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(claim_regular("alice", 7))
            .then_expect_error(VoucherError::NotFound);
    }

    #[test]
    fn claim_regular_of_a_seckill_voucher_is_refused() {
        framework()
            .given(vec![seckill_created(10)])
            .when(claim_regular("alice", 7))
            .then_expect_error(VoucherError::NotRegular);
    }

    #[test]
    fn claim_regular_before_the_window_is_refused() {
        framework_at(begins() - Duration::milliseconds(1))
            .given(vec![regular_created()])
            .when(claim_regular("alice", 7))
            .then_expect_error(VoucherError::SaleNotStarted);
    }

    #[test]
    fn claim_regular_exactly_at_begins_is_accepted() {
        framework_at(begins())
            .given(vec![regular_created()])
            .when(claim_regular("alice", 7))
            .then_expect_events(vec![claimed_regular("alice", 7)]);
    }

    #[test]
    fn claim_regular_exactly_at_ends_is_refused() {
        framework_at(ends())
            .given(vec![regular_created()])
            .when(claim_regular("alice", 7))
            .then_expect_error(VoucherError::SaleEnded);
    }

    #[test]
    fn claim_regular_twice_is_refused() {
        framework()
            .given(vec![regular_created(), claimed_regular("alice", 7)])
            .when(claim_regular("alice", 8))
            .then_expect_error(VoucherError::AlreadyClaimed);
    }

    #[test]
    fn claim_regular_retried_with_the_same_coupon_is_a_no_op_even_after_the_sale() {
        framework_at(ends() + Duration::days(1))
            .given(vec![regular_created(), claimed_regular("alice", 7)])
            .when(claim_regular("alice", 7))
            .then_expect_events(vec![]);
    }

    #[test]
    fn claim_regular_by_another_user_is_accepted() {
        framework()
            .given(vec![regular_created(), claimed_regular("alice", 7)])
            .when(claim_regular("bob", 8))
            .then_expect_events(vec![claimed_regular("bob", 8)]);
    }

    // ---- ProcessSeckillClaims ----

    #[test]
    fn batch_against_a_missing_voucher_fails_as_a_whole() {
        framework()
            .given_no_previous_events()
            .when(batch(vec![claim(1, "alice", during())]))
            .then_expect_error(VoucherError::NotFound);
    }

    #[test]
    fn an_empty_batch_records_nothing() {
        framework()
            .given(vec![seckill_created(3)])
            .when(batch(vec![]))
            .then_expect_events(vec![]);
    }

    #[test]
    fn batch_accepts_claims_within_stock() {
        framework()
            .given(vec![seckill_created(3)])
            .when(batch(vec![claim(1, "alice", during()), claim(2, "bob", during())]))
            .then_expect_events(vec![accepted(1, "alice", during()), accepted(2, "bob", during())]);
    }

    #[test]
    fn batch_against_a_regular_voucher_rejects_each_claim() {
        framework()
            .given(vec![regular_created()])
            .when(batch(vec![claim(1, "alice", during())]))
            .then_expect_events(vec![rejected(1, "alice", ClaimRejection::NotSeckill)]);
    }

    #[test]
    fn batch_judges_the_window_at_request_time_with_inclusive_begin_and_exclusive_end() {
        // The service clock is far past the sale: only requested_at counts.
        framework_at(ends() + Duration::days(30))
            .given(vec![seckill_created(10)])
            .when(batch(vec![
                claim(1, "early", begins() - Duration::milliseconds(1)),
                claim(2, "first", begins()),
                claim(3, "last", ends() - Duration::milliseconds(1)),
                claim(4, "late", ends()),
            ]))
            .then_expect_events(vec![
                rejected(1, "early", ClaimRejection::SaleNotStarted),
                accepted(2, "first", begins()),
                accepted(3, "last", ends() - Duration::milliseconds(1)),
                rejected(4, "late", ClaimRejection::SaleEnded),
            ]);
    }

    #[test]
    fn batch_rejects_a_second_order_of_the_same_user() {
        framework()
            .given(vec![seckill_created(10)])
            .when(batch(vec![
                claim(1, "alice", during()),
                claim(2, "alice", during()),
                claim(3, "alice", during()),
            ]))
            .then_expect_events(vec![
                accepted(1, "alice", during()),
                rejected(2, "alice", ClaimRejection::AlreadyPurchased),
                rejected(3, "alice", ClaimRejection::AlreadyPurchased),
            ]);
    }

    #[test]
    fn batch_decides_a_duplicated_order_id_once() {
        framework()
            .given(vec![seckill_created(10)])
            .when(batch(vec![
                claim(1, "alice", during()),
                claim(1, "alice", during()),
                claim(2, "bob", before_sale()),
                claim(2, "bob", during()),
            ]))
            .then_expect_events(vec![
                accepted(1, "alice", during()),
                rejected(2, "bob", ClaimRejection::SaleNotStarted),
            ]);
    }

    fn before_sale() -> DateTime<Utc> {
        begins() - Duration::minutes(1)
    }

    #[test]
    fn batch_redelivered_across_batches_records_nothing() {
        framework()
            .given(vec![
                seckill_created(1),
                accepted(1, "alice", during()),
                rejected(2, "bob", ClaimRejection::SoldOut),
            ])
            .when(batch(vec![claim(1, "alice", during()), claim(2, "bob", during())]))
            .then_expect_events(vec![]);
    }

    #[test]
    fn redelivery_of_a_released_order_is_not_decided_again() {
        framework()
            .given(vec![
                seckill_created(1),
                accepted(1, "alice", during()),
                released(1, "alice"),
            ])
            .when(batch(vec![claim(1, "alice", during())]))
            .then_expect_events(vec![]);
    }

    #[test]
    fn batch_with_more_claims_than_stock_sells_out() {
        framework()
            .given(vec![seckill_created(2), accepted(1, "alice", during())])
            .when(batch(vec![
                claim(2, "bob", during()),
                claim(3, "carol", during()),
                claim(4, "dave", during()),
            ]))
            .then_expect_events(vec![
                accepted(2, "bob", during()),
                rejected(3, "carol", ClaimRejection::SoldOut),
                rejected(4, "dave", ClaimRejection::SoldOut),
            ]);
    }

    #[test]
    fn a_released_unit_goes_to_a_new_buyer_but_not_back_to_its_first_buyer() {
        framework()
            .given(vec![
                seckill_created(1),
                accepted(1, "alice", during()),
                rejected(2, "bob", ClaimRejection::SoldOut),
                released(1, "alice"),
            ])
            .when(batch(vec![
                claim(3, "alice", during()),
                claim(4, "bob", during()),
                claim(5, "carol", during()),
            ]))
            .then_expect_events(vec![
                rejected(3, "alice", ClaimRejection::AlreadyPurchased),
                accepted(4, "bob", during()),
                rejected(5, "carol", ClaimRejection::SoldOut),
            ]);
    }

    #[test]
    fn a_user_rejected_before_the_sale_may_buy_during_it() {
        framework()
            .given(vec![
                seckill_created(1),
                rejected(1, "alice", ClaimRejection::SaleNotStarted),
            ])
            .when(batch(vec![claim(2, "alice", during())]))
            .then_expect_events(vec![accepted(2, "alice", during())]);
    }

    #[test]
    fn a_batch_checks_purchase_before_stock() {
        framework()
            .given(vec![seckill_created(1), accepted(1, "alice", during())])
            .when(batch(vec![claim(2, "alice", during())]))
            .then_expect_events(vec![rejected(2, "alice", ClaimRejection::AlreadyPurchased)]);
    }

    // ---- ReleaseSeckillStock ----

    fn release(order: u128) -> VoucherCommand {
        VoucherCommand::ReleaseSeckillStock { order_id: id(order) }
    }

    #[test]
    fn release_returns_the_unit_of_an_accepted_order() {
        framework()
            .given(vec![seckill_created(1), accepted(1, "alice", during())])
            .when(release(1))
            .then_expect_events(vec![released(1, "alice")]);
    }

    #[test]
    fn release_on_a_missing_voucher_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(release(1))
            .then_expect_error(VoucherError::NotFound);
    }

    #[test]
    fn release_of_an_order_never_accepted_is_refused() {
        framework()
            .given(vec![seckill_created(1)])
            .when(release(1))
            .then_expect_error(VoucherError::ClaimNotFound);
    }

    #[test]
    fn release_of_a_rejected_order_is_refused() {
        framework()
            .given(vec![seckill_created(1), rejected(1, "alice", ClaimRejection::SoldOut)])
            .when(release(1))
            .then_expect_error(VoucherError::ClaimNotFound);
    }

    #[test]
    fn release_twice_is_a_no_op() {
        framework()
            .given(vec![
                seckill_created(1),
                accepted(1, "alice", during()),
                released(1, "alice"),
            ])
            .when(release(1))
            .then_expect_events(vec![]);
    }

    // ---- state and helpers ----

    #[test]
    fn helpers_read_the_folded_state() {
        let voucher: Voucher = replay(vec![
            seckill_created(3),
            accepted(1, "alice", during()),
            accepted(2, "bob", during()),
            rejected(3, "carol", ClaimRejection::SoldOut),
            released(1, "alice"),
        ]);
        assert!(voucher.exists());
        assert_eq!(voucher.kind(), Some(VoucherKind::Seckill));
        assert_eq!(voucher.stock(), Some(3));
        assert_eq!(voucher.remaining(), 2);
        assert_eq!(voucher.claimed(), 1);
        assert_eq!(voucher.accepted_count(), 2);
        assert_eq!(voucher.released_count(), 1);
        assert_eq!(voucher.rejected_count(), 1);
        assert_eq!(
            voucher.decision(id(1)),
            Some(Decision::Accepted {
                user_id: "alice".into()
            })
        );
        assert_eq!(
            voucher.decision(id(3)),
            Some(Decision::Rejected(ClaimRejection::SoldOut))
        );
        assert_eq!(voucher.decision(id(9)), None);
        assert!(voucher.is_released(id(1)));
        assert!(voucher.has_purchased("alice"));
        assert!(!voucher.has_purchased("carol"));
        assert_eq!(voucher.title(), Some("Two coffees for one"));
        assert_eq!(voucher.price_cents(), Some(990));
        assert_eq!(voucher.value_cents(), Some(1500));
        assert_eq!(voucher.min_spend_cents(), Some(3000));
        assert_eq!(voucher.ends_at(), Some(ends()));
        assert_eq!(voucher.begins_at(), Some(begins()));
        assert_eq!(voucher.merchant_id(), Some("merchant-1"));

        let regular: Voucher = replay(vec![regular_created(), claimed_regular("alice", 7)]);
        assert_eq!(regular.claimed(), 1);
        assert_eq!(regular.remaining(), 0);
        assert_eq!(regular.stock(), None);
        assert_eq!(regular.regular_coupon("alice"), Some(id(7)));

        let missing = Voucher::default();
        assert!(!missing.exists());
        assert_eq!(missing.kind(), None);
        assert_eq!(missing.remaining(), 0);
    }

    #[test]
    fn apply_tolerates_repeated_and_stray_events() {
        let voucher: Voucher = replay(vec![
            seckill_created(2),
            released(9, "nobody"),
            accepted(1, "alice", during()),
            accepted(1, "alice", during()),
            released(1, "alice"),
            released(1, "alice"),
        ]);
        assert_eq!(voucher.remaining(), 2);
        assert_eq!(voucher.claimed(), 0);
        assert_eq!(voucher.released_count(), 1);
    }

    #[test]
    fn every_error_has_a_code_and_a_status() {
        let all = [
            VoucherError::NotFound,
            VoucherError::AlreadyExists,
            VoucherError::EmptyTitle,
            VoucherError::TitleTooLong,
            VoucherError::NegativePrice,
            VoucherError::NegativeMinSpend,
            VoucherError::NonPositiveValue,
            VoucherError::StockRequired,
            VoucherError::StockOutOfRange,
            VoucherError::StockNotAllowed,
            VoucherError::InvalidWindow,
            VoucherError::NotRegular,
            VoucherError::SaleNotStarted,
            VoucherError::SaleEnded,
            VoucherError::AlreadyClaimed,
            VoucherError::ClaimNotFound,
        ];
        let codes: BTreeSet<_> = all.iter().map(DomainError::code).collect();
        assert_eq!(codes.len(), all.len());
        assert_eq!(VoucherError::NotFound.kind().http_status(), 404);
        assert_eq!(VoucherError::AlreadyClaimed.kind().http_status(), 409);
        assert_eq!(VoucherError::SaleEnded.kind().http_status(), 403);
        assert_eq!(VoucherError::InvalidWindow.kind().http_status(), 422);
    }

    /// A tiny LCG (Knuth's MMIX constants), so the run is the same every time.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_claims_never_oversell_nor_sell_twice_to_a_user() {
        const CLAIMS: usize = 5_000;
        const USERS: u64 = 2_000;
        const STOCK: u32 = 500;
        const BATCH: usize = 97;

        let mut rng = Lcg(0x5EC_C111);
        let services = services_at(during());
        let mut voucher: Voucher = replay(vec![seckill_created(STOCK)]);
        let mut log = vec![seckill_created(STOCK)];

        // Some order ids repeat (redeliveries), all inside the window.
        let mut claims = Vec::with_capacity(CLAIMS);
        for n in 0..CLAIMS {
            let order = if n > 0 && rng.below(10) == 0 {
                claims_order(&claims, rng.below(n as u64) as usize)
            } else {
                id(1_000_000 + n as u128)
            };
            let user = format!("user-{}", rng.below(USERS));
            let requested_at = begins() + Duration::milliseconds(rng.below(2 * HOUR as u64 * 1000) as i64);
            claims.push(SeckillClaim {
                order_id: order,
                user_id: user,
                requested_at,
            });
        }
        // A redelivered claim carries the original's user and time.
        let originals: HashMap<Uuid, SeckillClaim> = claims.iter().rev().map(|c| (c.order_id, c.clone())).collect();
        let claims: Vec<SeckillClaim> = claims.into_iter().map(|c| originals[&c.order_id].clone()).collect();
        let distinct_orders: HashSet<Uuid> = claims.iter().map(|c| c.order_id).collect();

        for chunk in claims.chunks(BATCH) {
            let events = execute(&mut voucher, batch(chunk.to_vec()), &services).unwrap();
            log.extend(events);
            assert!(voucher.claimed() <= STOCK);
        }

        let mut accepted_orders = HashSet::new();
        let mut accepted_users = HashSet::new();
        let mut rejected_orders = HashSet::new();
        for event in &log {
            match event {
                VoucherEvent::SeckillClaimAccepted { order_id, user_id, .. } => {
                    assert!(accepted_orders.insert(*order_id), "order accepted twice");
                    assert!(accepted_users.insert(user_id.clone()), "user {user_id} accepted twice");
                }
                VoucherEvent::SeckillClaimRejected { order_id, .. } => {
                    assert!(rejected_orders.insert(*order_id), "order rejected twice");
                }
                _ => {}
            }
        }
        assert_eq!(accepted_orders.len(), STOCK as usize);
        assert!(accepted_orders.is_disjoint(&rejected_orders));
        assert_eq!(accepted_orders.len() + rejected_orders.len(), distinct_orders.len());
        assert_eq!(voucher.remaining(), 0);
        assert_eq!(voucher, replay::<Voucher>(log));
    }

    fn claims_order(claims: &[SeckillClaim], index: usize) -> Uuid {
        claims[index].order_id
    }
}
