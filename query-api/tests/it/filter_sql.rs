//! The SQL of `query_api::filter` against a real, migrated `order_view`:
//! valid Postgres, the documented semantics (nulls, `$ne`, `$nin`, nested
//! fields, microsecond timestamps), keyset pages that add up to the whole
//! order without duplicates or gaps, and values that stay values.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};
use query_api::filter::{ListParams, OrderQuery};
use serde_json::{Value, json};
use sqlx::{PgPool, Row as _};

struct Order {
    id: &'static str,
    user_id: &'static str,
    status: Option<&'static str>,
    kind: &'static str,
    total_cents: Option<i64>,
    coupon_id: Option<&'static str>,
    /// (payment_id, status, amount_cents)
    payment: Option<(&'static str, &'static str, i64)>,
    rejection: Option<&'static str>,
    created_at: Option<&'static str>,
    updated_at: Option<&'static str>,
    version: i64,
}

/// Ties on every sort key (created_at o02/o03 and o08/o09, total_cents,
/// status), a NULL in each sort key, and microseconds that matter.
#[rustfmt::skip]
const ORDERS: &[Order] = &[
    order("o01", "u1", Some("paid"), "goods", Some(1500), Some("c1"), Some(("p1", "succeeded", 1500)), None, Some("2026-11-01T10:00:00Z"), Some("2026-11-01T10:05:00Z"), 4),
    order("o02", "u1", Some("pending_payment"), "seckill_voucher", Some(990), None, None, None, Some("2026-11-01T11:00:00Z"), Some("2026-11-01T11:00:00Z"), 2),
    order("o03", "u2", Some("rejected"), "seckill_voucher", Some(990), None, None, Some("sold_out"), Some("2026-11-01T11:00:00Z"), Some("2026-11-01T11:00:01Z"), 1),
    order("o04", "u2", Some("cancelled"), "goods", Some(3000), Some("c2"), Some(("p4", "failed", 3000)), None, Some("2026-11-02T09:00:00Z"), Some("2026-11-02T09:30:00Z"), 5),
    order("o05", "u3", Some("completed"), "goods", Some(2500), None, Some(("p5", "succeeded", 2500)), None, Some("2026-11-02T09:00:00.000001Z"), Some("2026-11-06T12:00:00Z"), 6),
    order("o06", "u1", Some("submitted"), "goods", None, None, None, None, Some("2026-11-03T08:00:00Z"), Some("2026-11-03T08:00:00Z"), 1),
    order("o07", "u3", Some("preparing"), "goods", Some(1500), Some("c3"), Some(("p7", "succeeded", 1500)), None, Some("2026-11-03T12:00:00Z"), Some("2026-11-04T08:00:00Z"), 5),
    order("o08", "u2", Some("paid"), "seckill_voucher", Some(500), None, Some(("p8", "succeeded", 500)), None, Some("2026-11-04T10:00:00Z"), Some("2026-11-04T10:01:00Z"), 3),
    order("o09", "u4", Some("pending_payment"), "goods", Some(0), None, None, None, Some("2026-11-04T10:00:00Z"), Some("2026-11-04T10:00:00Z"), 2),
    order("o10", "u4", Some("rejected"), "goods", None, None, None, Some("out_of_stock"), None, None, 1),
    order("o11", "u1", None, "goods", Some(700), None, None, None, Some("2026-11-05T00:00:00Z"), Some("2026-11-05T00:00:00Z"), 1),
];

#[expect(clippy::too_many_arguments, reason = "one line per fixture row")]
const fn order(
    id: &'static str,
    user_id: &'static str,
    status: Option<&'static str>,
    kind: &'static str,
    total_cents: Option<i64>,
    coupon_id: Option<&'static str>,
    payment: Option<(&'static str, &'static str, i64)>,
    rejection: Option<&'static str>,
    created_at: Option<&'static str>,
    updated_at: Option<&'static str>,
    version: i64,
) -> Order {
    Order {
        id,
        user_id,
        status,
        kind,
        total_cents,
        coupon_id,
        payment,
        rejection,
        created_at,
        updated_at,
        version,
    }
}

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("fixture timestamp")
        .with_timezone(&Utc)
}

fn order_uuid(id: &str) -> String {
    format!("00000000-0000-7000-8000-0000000000{}", &id[1..])
}

async fn insert(pool: &PgPool, o: &Order) -> anyhow::Result<()> {
    let doc = json!({
        "order_id": order_uuid(o.id),
        "user_id": o.user_id,
        "kind": o.kind,
        "status": o.status,
        "voucher_id": (o.kind == "seckill_voucher").then_some("00000000-0000-7000-8000-00000000aaaa"),
        "coupon_id": o.coupon_id,
        "subtotal_cents": o.total_cents,
        "discount_cents": o.total_cents.map(|_| 0),
        "total_cents": o.total_cents,
        "payment": o.payment.map(|(id, status, amount)| json!({"payment_id": id, "status": status, "amount_cents": amount})),
        "rejection": o.rejection.map(|code| json!({"code": code})),
        "items": [],
        "history": [],
        "version": o.version,
        "created_at": o.created_at,
        "updated_at": o.updated_at,
    });
    sqlx::query(
        "INSERT INTO order_view (id, version, doc, user_id, status, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(o.id)
    .bind(o.version)
    .bind(doc)
    .bind(o.user_id)
    .bind(o.status)
    .bind(o.created_at.map(time))
    .bind(o.updated_at.map(time))
    .execute(pool)
    .await?;
    Ok(())
}

async fn seeded() -> anyhow::Result<testkit::TestDb> {
    let db = testkit::TestDb::new().await?;
    for o in ORDERS {
        insert(&db.pool, o).await?;
    }
    Ok(db)
}

fn params(filter: Option<Value>, sort: Option<&str>, limit: Option<u32>, cursor: Option<String>) -> ListParams {
    ListParams {
        filter: filter.map(|f| f.to_string()),
        sort: sort.map(str::to_owned),
        limit: limit.map(|l| l.to_string()),
        cursor,
    }
}

/// One page, as the handler would fetch it; `customer` adds the handler's
/// own `user_id = $1` scope before the filter's parameters.
async fn page(
    pool: &PgPool,
    params: &ListParams,
    customer: Option<&str>,
) -> anyhow::Result<(Vec<String>, Option<String>)> {
    let query = OrderQuery::parse(params)?;
    let rows = match customer {
        Some(user_id) => {
            let sql = query.to_sql(1);
            let statement = sql.statement(Some("user_id = $1"));
            sql.bind(sqlx::query(&statement).bind(user_id)).fetch_all(pool).await?
        }
        None => {
            let sql = query.to_sql(0);
            let statement = sql.statement(None);
            sql.bind(sqlx::query(&statement)).fetch_all(pool).await?
        }
    };
    let page = query.page(rows)?;
    let ids = page
        .rows
        .iter()
        .map(|row| row.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
    Ok((ids, page.next_cursor))
}

/// Every page of a listing, following the cursors.
async fn all_pages(
    pool: &PgPool,
    filter: Option<Value>,
    sort: Option<&str>,
    limit: u32,
    customer: Option<&str>,
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let (ids, next) = page(pool, &params(filter.clone(), sort, Some(limit), cursor), customer).await?;
        pages.push(ids);
        match next {
            Some(next) => cursor = Some(next),
            None => return Ok(pages),
        }
        anyhow::ensure!(pages.len() <= ORDERS.len() + 2, "pagination does not end");
    }
}

async fn ids(pool: &PgPool, filter: Value) -> anyhow::Result<Vec<String>> {
    Ok(page(pool, &params(Some(filter), None, Some(200), None), None).await?.0)
}

fn strings(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Time(DateTime<Utc>),
    Int(i64),
    Text(&'static str),
}

/// The order a sort should produce, computed here rather than by Postgres:
/// NULL keys first when descending, last when ascending, ties by id.
fn expected_order(sort: &str) -> Vec<String> {
    let (field, descending) = match sort.strip_prefix('-') {
        Some(field) => (field, true),
        None => (sort, false),
    };
    let key = |o: &Order| match field {
        "created_at" => o.created_at.map(|t| Key::Time(time(t))),
        "updated_at" => o.updated_at.map(|t| Key::Time(time(t))),
        "total_cents" => o.total_cents.map(Key::Int),
        "status" => o.status.map(Key::Text),
        other => panic!("no sort {other}"),
    };
    let mut orders: Vec<&Order> = ORDERS.iter().collect();
    orders.sort_by(|a, b| {
        let by_key = match (key(a), key(b)) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => y.cmp(&x),
        };
        let order = by_key.then_with(|| b.id.cmp(a.id));
        if descending { order } else { order.reverse() }
    });
    orders.iter().map(|o| o.id.to_owned()).collect()
}

#[tokio::test]
async fn filters_select_exactly_the_matching_orders() -> anyhow::Result<()> {
    let db = seeded().await?;
    let pool = &db.pool;

    let cases = [
        (
            json!({}),
            vec![
                "o10", "o11", "o09", "o08", "o07", "o06", "o05", "o04", "o03", "o02", "o01",
            ],
        ),
        (json!({"status": "paid"}), vec!["o08", "o01"]),
        (json!({"kind": "seckill_voucher"}), vec!["o08", "o03", "o02"]),
        (json!({"order_id": order_uuid("o05")}), vec!["o05"]),
        (
            json!({"total_cents": {"$gte": 1000, "$lt": 3000}}),
            vec!["o07", "o05", "o01"],
        ),
        (json!({"total_cents": 1500}), vec!["o07", "o01"]),
        (
            json!({"version": {"$in": [1, 3]}}),
            vec!["o10", "o11", "o08", "o06", "o03"],
        ),
        (json!({"payment.status": "succeeded"}), vec!["o08", "o07", "o05", "o01"]),
        (json!({"payment.amount_cents": {"$gt": 1500}}), vec!["o05", "o04"]),
        (
            json!({"payment.payment_id": {"$exists": true}}),
            vec!["o08", "o07", "o05", "o04", "o01"],
        ),
        (
            json!({"rejection.code": {"$in": ["sold_out", "out_of_stock"]}}),
            vec!["o10", "o03"],
        ),
        (
            json!({"$or": [{"payment.status": "failed"}, {"rejection.code": "sold_out"}]}),
            vec!["o04", "o03"],
        ),
        (
            json!({"$and": [{"user_id": {"$in": ["u1", "u2"]}}, {"$or": [{"status": "paid"}, {"total_cents": null}]}]}),
            vec!["o08", "o06", "o01"],
        ),
        // null and absent are NULL; $ne and $nin include them, as in MongoDB
        (
            json!({"coupon_id": null}),
            vec!["o10", "o11", "o09", "o08", "o06", "o05", "o03", "o02"],
        ),
        (
            json!({"coupon_id": {"$ne": "c1"}}),
            vec!["o10", "o11", "o09", "o08", "o07", "o06", "o05", "o04", "o03", "o02"],
        ),
        (json!({"coupon_id": {"$ne": null}}), vec!["o07", "o04", "o01"]),
        (
            json!({"status": {"$nin": ["paid", "rejected"]}}),
            vec!["o11", "o09", "o07", "o06", "o05", "o04", "o02"],
        ),
        (
            json!({"status": {"$nin": ["paid", "rejected", null]}}),
            vec!["o09", "o07", "o06", "o05", "o04", "o02"],
        ),
        (json!({"status": {"$in": ["paid", null]}}), vec!["o11", "o08", "o01"]),
        (
            json!({"voucher_id": {"$exists": false}, "kind": "seckill_voucher"}),
            vec![],
        ),
        // timestamps compare as instants, to the microsecond, whatever the offset
        (
            json!({"created_at": {"$gte": "2026-11-02T09:00:00.000001Z", "$lt": "2026-11-04T01:00:00+01:00"}}),
            vec!["o07", "o06", "o05"],
        ),
        (
            json!({"created_at": {"$gt": "2026-11-02T09:00:00Z", "$lte": "2026-11-02T09:00:00.000001Z"}}),
            vec!["o05"],
        ),
        (json!({"created_at": null}), vec!["o10"]),
        (
            json!({"updated_at": {"$in": ["2026-11-01T11:00:00Z", "2026-11-01T11:00:01Z"]}}),
            vec!["o03", "o02"],
        ),
    ];
    for (filter, expected) in cases {
        assert_eq!(ids(pool, filter.clone()).await?, strings(&expected), "{filter}");
    }

    // the handler's own scope ($1) and the filter's parameters ($2, ...) together
    let (mine, _) = page(
        pool,
        &params(Some(json!({"status": {"$ne": "paid"}})), None, None, None),
        Some("u1"),
    )
    .await?;
    assert_eq!(mine, strings(&["o11", "o06", "o02"]));

    db.drop_database().await
}

#[tokio::test]
async fn pages_follow_each_sort_without_duplicates_or_gaps() -> anyhow::Result<()> {
    let db = seeded().await?;
    let pool = &db.pool;

    let sorts = [
        "-created_at",
        "created_at",
        "-updated_at",
        "updated_at",
        "-total_cents",
        "total_cents",
        "-status",
        "status",
    ];
    for sort in sorts {
        let expected = expected_order(sort);
        let (one_page, cursor) = page(pool, &params(None, Some(sort), Some(200), None), None).await?;
        assert_eq!(one_page, expected, "{sort} in one page");
        assert_eq!(cursor, None);
        for limit in [1, 2, 3, 10, 11] {
            let pages = all_pages(pool, None, Some(sort), limit, None).await?;
            assert!(
                pages.iter().all(|p| !p.is_empty() && p.len() <= limit as usize),
                "{sort}/{limit}: {pages:?}"
            );
            assert_eq!(pages.concat(), expected, "{sort} by {limit}");
        }
    }
    // the default is -created_at
    assert_eq!(
        all_pages(pool, None, None, 4, None).await?.concat(),
        expected_order("-created_at")
    );

    // filter, scope and cursor together: u1's orders without a coupon, by total
    let pages = all_pages(
        pool,
        Some(json!({"coupon_id": null})),
        Some("total_cents"),
        1,
        Some("u1"),
    )
    .await?;
    assert_eq!(pages, vec![strings(&["o11"]), strings(&["o02"]), strings(&["o06"])]);

    // a page's cursor with another sort is refused
    let (_, cursor) = page(pool, &params(None, Some("status"), Some(2), None), None).await?;
    let refused = OrderQuery::parse(&params(None, Some("-status"), Some(2), cursor));
    assert_eq!(refused.map_err(|e| e.code()).err(), Some("invalid_cursor"));

    // stable under inserts: rows added before the position do not shift the next page
    let (first, cursor) = page(pool, &params(None, None, Some(4), None), None).await?;
    assert_eq!(first, strings(&["o10", "o11", "o09", "o08"]));
    #[rustfmt::skip]
    let newest = order("o12", "u1", Some("paid"), "goods", Some(1), None, None, None, Some("2026-12-01T00:00:00Z"), None, 1);
    #[rustfmt::skip]
    let oldest = order("o00", "u1", Some("paid"), "goods", Some(1), None, None, None, Some("2026-10-01T00:00:00Z"), None, 1);
    insert(pool, &newest).await?;
    insert(pool, &oldest).await?;
    let mut rest = Vec::new();
    let mut cursor = cursor;
    while let Some(c) = cursor {
        let (ids, next) = page(pool, &params(None, None, Some(4), Some(c)), None).await?;
        rest.extend(ids);
        cursor = next;
    }
    assert_eq!(rest, strings(&["o07", "o06", "o05", "o04", "o03", "o02", "o01", "o00"]));

    db.drop_database().await
}

#[tokio::test]
async fn injected_values_match_nothing_and_change_nothing() -> anyhow::Result<()> {
    let db = seeded().await?;
    let pool = &db.pool;

    let evil = [
        "x' OR '1'='1",
        "'; DROP TABLE order_view; --",
        "paid') OR TRUE --",
        "\\'; DELETE FROM order_view; --",
    ];
    for value in evil {
        for filter in [
            json!({"status": value}),
            json!({"kind": value}),
            json!({"payment.status": value}),
            json!({"user_id": {"$in": [value]}}),
            json!({"$or": [{"rejection.code": value}, {"coupon_id": {"$eq": value}}]}),
        ] {
            assert_eq!(ids(pool, filter.clone()).await?, Vec::<String>::new(), "{filter}");
        }
        // in the handler's scope parameter too
        let (theirs, _) = page(pool, &params(None, None, None, None), Some(value)).await?;
        assert!(theirs.is_empty());
    }
    // an injected field name never gets as far as the database
    let refused = OrderQuery::parse(&params(
        Some(json!({"status = status OR TRUE; --": 1})),
        None,
        None,
        None,
    ));
    assert_eq!(refused.map_err(|e| e.code()).err(), Some("invalid_filter"));

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM order_view")
        .fetch_one(pool)
        .await?;
    assert_eq!(count, ORDERS.len() as i64);

    db.drop_database().await
}
