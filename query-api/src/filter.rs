//! `GET /orders`' `filter`, `sort`, `limit` and `cursor` parameters, turned
//! into one parameterized Postgres statement over `order_view`. Pure: no I/O.
//!
//! Two rules keep client input out of the SQL text: a field name only ever
//! selects one of the fixed SQL expressions written in `FIELDS`, and every
//! value is a bound parameter ([`Param`]).
//!
//! # Filter language
//!
//! A JSON object in MongoDB query style. `{"a": v, "b": w}` is an implicit
//! AND; `$and` / `$or` take non-empty arrays of filter objects; a field takes
//! a value (equality) or an object of operators `$eq $ne $gt $gte $lt $lte
//! $in $nin $exists` (several are ANDed). Anything else is an error.
//!
//! Filterable fields (dotted names reach into `payment` and `rejection`):
//!
//! | type | fields |
//! |---|---|
//! | text (JSON string) | `order_id user_id merchant_id kind status voucher_id coupon_id payment.status payment.payment_id rejection.code` |
//! | integer (JSON integer, no floats or strings) | `subtotal_cents discount_cents total_cents version payment.amount_cents` |
//! | timestamp (RFC 3339 string) | `created_at updated_at` |
//!
//! Semantics where SQL and MongoDB differ, resolved the MongoDB way:
//! - an absent field and a JSON `null` are the same thing, SQL NULL;
//! - `{"f": null}` / `$eq: null` / `$exists: false` match NULL, `$ne: null` /
//!   `$exists: true` match non-NULL, and `null` may appear in `$in` / `$nin`;
//! - `$ne` and `$nin` also match documents where the field is NULL (so
//!   `{"coupon_id": {"$ne": X}}` includes orders without a coupon);
//! - `$gt`-style comparisons on text use the database collation.
//!
//! # Sort and pagination
//!
//! `sort` is `created_at`, `updated_at`, `total_cents` or `status`, `-` in
//! front for descending; the default is `-created_at`. `id` breaks ties in
//! the same direction, so the order is total and a keyset cursor (the last
//! row's sort key and id) resumes exactly after the last row, whatever was
//! inserted meanwhile. NULL sort keys sort first when descending and last
//! when ascending (Postgres' defaults, which the `(created_at DESC, id DESC)`
//! indexes match); the cursor condition handles them explicitly instead of
//! COALESCE so the default sort still uses those indexes.
//!
//! # Usage
//!
//! ```no_run
//! use query_api::filter::{ListParams, OrderQuery};
//! use sqlx::Row as _;
//!
//! # async fn list(pool: sqlx::PgPool, params: ListParams, user_id: String) -> anyhow::Result<()> {
//! let query = OrderQuery::parse(&params)?; // any FilterError is a 400 with its code()
//! // the handler's own condition uses $1, so the filter's parameters start at $2
//! let sql = query.to_sql(1);
//! let statement = sql.statement(Some("user_id = $1"));
//! let rows = sql.bind(sqlx::query(&statement).bind(user_id)).fetch_all(&pool).await?;
//! let page = query.page(rows)?;
//! let items = page
//!     .rows
//!     .iter()
//!     .map(|row| row.try_get::<serde_json::Value, _>("doc"))
//!     .collect::<Result<Vec<_>, _>>()?;
//! // respond with {"items": items, "next_cursor": page.next_cursor}
//! # Ok(()) }
//! ```

use std::fmt;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::{
    Postgres, Row as _,
    postgres::{PgArguments, PgRow},
    query::{Query, QueryAs},
};

/// The longest `filter` accepted, in bytes. The handler may check it first
/// (e.g. before URL decoding); [`OrderQuery::parse`] checks it again.
pub const MAX_FILTER_BYTES: usize = 8 * 1024;
/// How deeply `$and` / `$or` may nest; the top-level object is depth 1.
pub const MAX_DEPTH: usize = 8;
/// How many field conditions a filter may hold in total (each operator counts).
pub const MAX_CONDITIONS: usize = 50;
/// How many values one `$in` / `$nin` may list.
pub const MAX_IN_VALUES: usize = 100;
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;
/// Our cursors are ~100 bytes; a much longer one was not made here, and
/// refusing it early bounds the decoding work.
const MAX_CURSOR_BYTES: usize = 1024;
/// Client input quoted back in error messages is cut to this many characters.
const MAX_ECHO_CHARS: usize = 64;

/// Why the list parameters were refused. Every variant is the client's
/// fault (400); [`FilterError::code`] names the parameter for the error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("filter is longer than {MAX_FILTER_BYTES} bytes")]
    TooLarge,
    #[error("filter is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("a filter must be a JSON object")]
    NotAnObject,
    #[error("unknown field `{0}`")]
    UnknownField(String),
    #[error("unknown or unsupported operator `{0}`")]
    UnknownOperator(String),
    #[error("`{field}` takes {expected}")]
    TypeMismatch {
        field: &'static str,
        expected: &'static str,
    },
    #[error("`{operator}` takes {expected}")]
    BadOperand {
        operator: &'static str,
        expected: &'static str,
    },
    #[error("`{operator}` takes at most {MAX_IN_VALUES} values")]
    TooManyValues { operator: &'static str },
    #[error("filter nests `$and`/`$or` deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("filter has more than {MAX_CONDITIONS} conditions")]
    TooManyConditions,
    #[error("limit must be an integer from 1 to {MAX_LIMIT}")]
    BadLimit,
    #[error(
        "cannot sort by `{0}`: use created_at, updated_at, total_cents or status, with a leading `-` for descending"
    )]
    BadSort(String),
    #[error("invalid cursor")]
    BadCursor,
    #[error("the cursor was made for sort `{cursor}`, not `{requested}`")]
    CursorSortMismatch { cursor: String, requested: String },
}

impl FilterError {
    /// The `error.code` of the 400 response: which parameter is wrong.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge
            | Self::MalformedJson(_)
            | Self::NotAnObject
            | Self::UnknownField(_)
            | Self::UnknownOperator(_)
            | Self::TypeMismatch { .. }
            | Self::BadOperand { .. }
            | Self::TooManyValues { .. }
            | Self::TooDeep
            | Self::TooManyConditions => "invalid_filter",
            Self::BadLimit => "invalid_limit",
            Self::BadSort(_) => "invalid_sort",
            Self::BadCursor | Self::CursorSortMismatch { .. } => "invalid_cursor",
        }
    }
}

/// A bound value, in the order of its `$n`. The Rust types decide the
/// Postgres types sqlx sends (text, int8, timestamptz, their arrays, jsonb).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
    TextArray(Vec<String>),
    IntArray(Vec<i64>),
    TimeArray(Vec<DateTime<Utc>>),
    /// A document fragment for `doc @> $n`.
    Json(Value),
}

/// Query types that [`OrderSql::bind`] can bind [`Param`]s onto: sqlx's
/// `query(..)` and `query_as(..)` for Postgres.
pub trait BindParam: Sized {
    fn bind_param(self, param: Param) -> Self;
}

macro_rules! bind_param {
    ($query:expr, $param:expr) => {
        match $param {
            Param::Text(v) => $query.bind(v),
            Param::Int(v) => $query.bind(v),
            Param::Time(v) => $query.bind(v),
            Param::TextArray(v) => $query.bind(v),
            Param::IntArray(v) => $query.bind(v),
            Param::TimeArray(v) => $query.bind(v),
            Param::Json(v) => $query.bind(v),
        }
    };
}

impl<'q> BindParam for Query<'q, Postgres, PgArguments> {
    fn bind_param(self, param: Param) -> Self {
        bind_param!(self, param)
    }
}

impl<'q, O> BindParam for QueryAs<'q, Postgres, O, PgArguments> {
    fn bind_param(self, param: Param) -> Self {
        bind_param!(self, param)
    }
}

/// The raw query-string parameters, as the client sent them. Strings (not
/// numbers) so that every malformed value gets this module's error codes;
/// `#[serde(flatten)]` it into the handler's own query struct.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListParams {
    pub filter: Option<String>,
    pub sort: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// A validated `GET /orders` listing: turn it into SQL with
/// [`OrderQuery::to_sql`], then the fetched rows into a page with
/// [`OrderQuery::page`].
#[derive(Debug, Clone, PartialEq)]
pub struct OrderQuery {
    filter: Node,
    sort: Sort,
    limit: u32,
    after: Option<Position>,
}

impl OrderQuery {
    pub fn parse(params: &ListParams) -> Result<Self, FilterError> {
        let limit = parse_limit(params.limit.as_deref())?;
        let sort = Sort::parse(params.sort.as_deref())?;
        let after = params.cursor.as_deref().map(|c| decode_cursor(c, sort)).transpose()?;
        let filter = match params.filter.as_deref() {
            Some(filter) => parse_filter(filter)?,
            None => Node::And(Vec::new()),
        };
        Ok(Self {
            filter,
            sort,
            limit,
            after,
        })
    }

    /// The page size asked for.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The SQL, numbering its parameters from `$(params_before + 1)`:
    /// `params_before` is how many parameters the caller's own conditions
    /// use (and binds before [`OrderSql::bind`]), 0 if none.
    pub fn to_sql(&self, params_before: usize) -> OrderSql {
        let mut w = SqlWriter {
            params: Vec::new(),
            params_before,
        };
        let filter = w.node(&self.filter);
        let where_sql = match &self.after {
            None => filter,
            Some(after) if self.filter == Node::And(Vec::new()) => w.keyset(self.sort, after),
            Some(after) => format!("{filter} AND {}", w.keyset(self.sort, after)),
        };
        OrderSql {
            where_sql,
            order_by: self.sort.order_by(),
            sort_key: self.sort.field.select_item(),
            fetch_limit: i64::from(self.limit) + 1,
            params: w.params,
        }
    }

    /// Trims the rows fetched with [`OrderSql::statement`] to the page and
    /// sets `next_cursor` when the lookahead row shows there is more. Reads
    /// the `id` and `sort_key` columns of the last row kept.
    pub fn page(&self, mut rows: Vec<PgRow>) -> Result<Page, sqlx::Error> {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        if rows.len() <= limit {
            return Ok(Page {
                rows,
                next_cursor: None,
            });
        }
        rows.truncate(limit);
        let next_cursor = match rows.last() {
            Some(last) => Some(encode_cursor(self.sort, &position_of(last, self.sort)?)),
            None => None,
        };
        Ok(Page { rows, next_cursor })
    }
}

/// The listing as SQL. Use [`OrderSql::statement`] for the whole SELECT, or
/// the parts for a statement of your own (then select `sort_key` and `id`
/// too, or [`OrderQuery::page`] cannot build the cursor).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderSql {
    /// A boolean expression, safe to AND with others without parentheses:
    /// the filter and the cursor's keyset condition, `TRUE` when neither.
    pub where_sql: String,
    /// The ORDER BY list (without the keywords), ending with `id`.
    pub order_by: &'static str,
    /// The SELECT-list item `<sort expression> AS sort_key`.
    pub sort_key: &'static str,
    /// For LIMIT: one more than the page size, the lookahead row that tells
    /// [`OrderQuery::page`] whether another page follows.
    pub fetch_limit: i64,
    /// The values of `$(params_before + 1)`, ... in order.
    pub params: Vec<Param>,
}

impl OrderSql {
    /// `SELECT id, doc, sort_key FROM order_view WHERE ...`. `scope` is the
    /// caller's own boolean condition (its parameters numbered from `$1`, as
    /// many as the `params_before` given to [`OrderQuery::to_sql`]); it is
    /// fixed SQL of the handler, never client input.
    pub fn statement(&self, scope: Option<&str>) -> String {
        let scope = scope.map(|s| format!("({s}) AND ")).unwrap_or_default();
        format!(
            "SELECT id, doc, {} FROM order_view WHERE {scope}({}) ORDER BY {} LIMIT {}",
            self.sort_key, self.where_sql, self.order_by, self.fetch_limit
        )
    }

    /// Binds [`OrderSql::params`] after whatever `query` already has bound
    /// (the caller's own `params_before` values).
    pub fn bind<Q: BindParam>(&self, query: Q) -> Q {
        self.params.iter().cloned().fold(query, Q::bind_param)
    }
}

/// One page of rows, in order, and the cursor for the next one.
#[derive(Debug)]
pub struct Page {
    pub rows: Vec<PgRow>,
    pub next_cursor: Option<String>,
}

// ---------------------------------------------------------------- fields

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldType {
    Text,
    Int,
    Time,
}

impl FieldType {
    fn expected(self) -> &'static str {
        match self {
            Self::Text => "a string",
            Self::Int => "an integer",
            Self::Time => "an RFC 3339 timestamp string",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Field {
    name: &'static str,
    ty: FieldType,
    /// Yields the field, NULL when absent or JSON null.
    sql: &'static str,
    /// Where the field sits in `doc`, for equality as `doc @> {...}`, which
    /// the GIN index on `doc` serves; `None` for fields read from columns,
    /// whose btree indexes serve `=` (and whose document value, for
    /// timestamps, is a string that need not match byte for byte).
    doc_path: Option<&'static [&'static str]>,
}

/// The filterable fields. The columns `user_id`, `status`, `created_at`,
/// `updated_at` and `version` are copies of the document's fields that the
/// projection writes with it (and that the indexes cover).
const FIELDS: &[Field] = &[
    doc_field("order_id", FieldType::Text, "(doc->>'order_id')", &["order_id"]),
    column("user_id", FieldType::Text, "user_id"),
    column("merchant_id", FieldType::Text, "merchant_id"),
    doc_field("kind", FieldType::Text, "(doc->>'kind')", &["kind"]),
    column("status", FieldType::Text, "status"),
    doc_field("voucher_id", FieldType::Text, "(doc->>'voucher_id')", &["voucher_id"]),
    doc_field("coupon_id", FieldType::Text, "(doc->>'coupon_id')", &["coupon_id"]),
    doc_field(
        "subtotal_cents",
        FieldType::Int,
        "((doc->>'subtotal_cents')::bigint)",
        &["subtotal_cents"],
    ),
    doc_field(
        "discount_cents",
        FieldType::Int,
        "((doc->>'discount_cents')::bigint)",
        &["discount_cents"],
    ),
    doc_field("total_cents", FieldType::Int, TOTAL_CENTS, &["total_cents"]),
    column("version", FieldType::Int, "version"),
    column("created_at", FieldType::Time, "created_at"),
    column("updated_at", FieldType::Time, "updated_at"),
    doc_field(
        "payment.status",
        FieldType::Text,
        "(doc#>>'{payment,status}')",
        &["payment", "status"],
    ),
    doc_field(
        "payment.payment_id",
        FieldType::Text,
        "(doc#>>'{payment,payment_id}')",
        &["payment", "payment_id"],
    ),
    doc_field(
        "payment.amount_cents",
        FieldType::Int,
        "((doc#>>'{payment,amount_cents}')::bigint)",
        &["payment", "amount_cents"],
    ),
    doc_field(
        "rejection.code",
        FieldType::Text,
        "(doc#>>'{rejection,code}')",
        &["rejection", "code"],
    ),
];

const TOTAL_CENTS: &str = "((doc->>'total_cents')::bigint)";

/// The part of an order document the GIN index covers (migration
/// `20261130000001`): everything but its arrays, which no filter reads.
/// Equality filters on document fields query this very expression, so the
/// index serves them.
const DOC_INDEXED: &str = "(doc - 'items' - 'history')";

const fn column(name: &'static str, ty: FieldType, sql: &'static str) -> Field {
    Field {
        name,
        ty,
        sql,
        doc_path: None,
    }
}

const fn doc_field(name: &'static str, ty: FieldType, sql: &'static str, path: &'static [&'static str]) -> Field {
    Field {
        name,
        ty,
        sql,
        doc_path: Some(path),
    }
}

fn field(name: &str) -> Result<&'static Field, FilterError> {
    FIELDS
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| FilterError::UnknownField(echo(name)))
}

fn echo(input: &str) -> String {
    match input.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &input[..cut]),
        None => input.to_owned(),
    }
}

// ---------------------------------------------------------------- filter

/// A parsed filter, every field resolved and every value typed.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Cond(&'static Field, Cond),
}

impl Node {
    fn and(mut nodes: Vec<Node>) -> Node {
        if nodes.len() == 1 {
            nodes.remove(0)
        } else {
            Node::And(nodes)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    IsNull,
    NotNull,
    Eq(Scalar),
    Ne(Scalar),
    Range(RangeOp, Scalar),
    /// `null_too`: the list had a `null`, which `= ANY` cannot match.
    In {
        values: Vec<Scalar>,
        null_too: bool,
    },
    NotIn {
        values: Vec<Scalar>,
        null_too: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeOp {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl RangeOp {
    fn sql(self) -> &'static str {
        match self {
            Self::Gt => ">",
            Self::Gte => ">=",
            Self::Lt => "<",
            Self::Lte => "<=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
}

impl Scalar {
    /// The value of `ty` that `value` is, if any. NUL is refused in text
    /// because Postgres text and jsonb cannot hold it (a 500 otherwise).
    fn parse(ty: FieldType, value: &Value) -> Option<Scalar> {
        match ty {
            FieldType::Text => value
                .as_str()
                .filter(|s| !s.contains('\0'))
                .map(|s| Scalar::Text(s.to_owned())),
            // as_i64 is None for floats (even 1.0) and for integers beyond i64
            FieldType::Int => value.as_i64().map(Scalar::Int),
            FieldType::Time => value
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| Scalar::Time(t.with_timezone(&Utc))),
        }
    }

    fn to_param(&self) -> Param {
        match self {
            Scalar::Text(v) => Param::Text(v.clone()),
            Scalar::Int(v) => Param::Int(*v),
            Scalar::Time(v) => Param::Time(*v),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Scalar::Text(v) => Value::from(v.as_str()),
            Scalar::Int(v) => Value::from(*v),
            Scalar::Time(v) => Value::from(v.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        }
    }
}

fn parse_filter(text: &str) -> Result<Node, FilterError> {
    if text.len() > MAX_FILTER_BYTES {
        return Err(FilterError::TooLarge);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| FilterError::MalformedJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(FilterError::NotAnObject);
    };
    FilterParser { conditions: 0 }.object(&object, 1).map(Node::and)
}

struct FilterParser {
    conditions: usize,
}

impl FilterParser {
    fn object(&mut self, object: &Map<String, Value>, depth: usize) -> Result<Vec<Node>, FilterError> {
        if depth > MAX_DEPTH {
            return Err(FilterError::TooDeep);
        }
        let mut nodes = Vec::with_capacity(object.len());
        for (key, value) in object {
            let node = match key.as_str() {
                "$and" => Node::And(self.list("$and", value, depth)?),
                "$or" => Node::Or(self.list("$or", value, depth)?),
                op if op.starts_with('$') => return Err(FilterError::UnknownOperator(echo(op))),
                name => self.field(field(name)?, value)?,
            };
            nodes.push(node);
        }
        Ok(nodes)
    }

    fn list(&mut self, operator: &'static str, value: &Value, depth: usize) -> Result<Vec<Node>, FilterError> {
        let bad = || FilterError::BadOperand {
            operator,
            expected: "a non-empty array of filter objects",
        };
        let items = value.as_array().filter(|items| !items.is_empty()).ok_or_else(bad)?;
        items
            .iter()
            .map(|item| match item {
                Value::Object(object) => self.object(object, depth + 1).map(Node::and),
                _ => Err(bad()),
            })
            .collect()
    }

    fn field(&mut self, field: &'static Field, value: &Value) -> Result<Node, FilterError> {
        match value {
            // Like MongoDB, an object is operators if it has any; a plain
            // object is an equality value, which no field's type allows.
            Value::Object(ops) if ops.keys().any(|k| k.starts_with('$')) => {
                let conds = ops
                    .iter()
                    .map(|(op, operand)| Ok(Node::Cond(field, self.operator(field, op, operand)?)))
                    .collect::<Result<Vec<_>, FilterError>>()?;
                Ok(Node::and(conds))
            }
            _ => {
                self.count()?;
                Ok(Node::Cond(field, equality(field, value)?))
            }
        }
    }

    fn operator(&mut self, field: &'static Field, op: &str, operand: &Value) -> Result<Cond, FilterError> {
        self.count()?;
        let typed = || scalar(field, operand);
        Ok(match op {
            "$eq" => equality(field, operand)?,
            "$ne" if operand.is_null() => Cond::NotNull,
            "$ne" => Cond::Ne(typed()?),
            "$gt" => Cond::Range(RangeOp::Gt, typed()?),
            "$gte" => Cond::Range(RangeOp::Gte, typed()?),
            "$lt" => Cond::Range(RangeOp::Lt, typed()?),
            "$lte" => Cond::Range(RangeOp::Lte, typed()?),
            "$in" => {
                let (values, null_too) = in_list(field, "$in", operand)?;
                Cond::In { values, null_too }
            }
            "$nin" => {
                let (values, null_too) = in_list(field, "$nin", operand)?;
                Cond::NotIn { values, null_too }
            }
            "$exists" => match operand {
                Value::Bool(true) => Cond::NotNull,
                Value::Bool(false) => Cond::IsNull,
                _ => {
                    return Err(FilterError::BadOperand {
                        operator: "$exists",
                        expected: "true or false",
                    });
                }
            },
            other => return Err(FilterError::UnknownOperator(echo(other))),
        })
    }

    fn count(&mut self) -> Result<(), FilterError> {
        self.conditions += 1;
        if self.conditions > MAX_CONDITIONS {
            return Err(FilterError::TooManyConditions);
        }
        Ok(())
    }
}

fn equality(field: &'static Field, value: &Value) -> Result<Cond, FilterError> {
    if value.is_null() {
        return Ok(Cond::IsNull);
    }
    Ok(Cond::Eq(scalar(field, value)?))
}

fn scalar(field: &'static Field, value: &Value) -> Result<Scalar, FilterError> {
    Scalar::parse(field.ty, value).ok_or(FilterError::TypeMismatch {
        field: field.name,
        expected: field.ty.expected(),
    })
}

fn in_list(field: &'static Field, operator: &'static str, operand: &Value) -> Result<(Vec<Scalar>, bool), FilterError> {
    let items = operand
        .as_array()
        .filter(|items| !items.is_empty())
        .ok_or(FilterError::BadOperand {
            operator,
            expected: "a non-empty array",
        })?;
    if items.len() > MAX_IN_VALUES {
        return Err(FilterError::TooManyValues { operator });
    }
    let mut null_too = false;
    let mut values = Vec::with_capacity(items.len());
    for item in items {
        if item.is_null() {
            null_too = true;
        } else {
            values.push(scalar(field, item)?);
        }
    }
    Ok((values, null_too))
}

// ---------------------------------------------------------------- SQL

struct SqlWriter {
    params: Vec<Param>,
    params_before: usize,
}

impl SqlWriter {
    fn bind(&mut self, param: Param) -> String {
        self.params.push(param);
        format!("${}", self.params_before + self.params.len())
    }

    fn node(&mut self, node: &Node) -> String {
        match node {
            Node::And(nodes) => self.join(nodes, " AND ", "TRUE"),
            Node::Or(nodes) => self.join(nodes, " OR ", "FALSE"),
            Node::Cond(field, cond) => self.cond(field, cond),
        }
    }

    /// Compound expressions are parenthesized, so every result can be
    /// ANDed or ORed with others as is.
    fn join(&mut self, nodes: &[Node], separator: &str, empty: &str) -> String {
        match nodes {
            [] => empty.to_owned(),
            [one] => self.node(one),
            many => {
                let parts: Vec<String> = many.iter().map(|n| self.node(n)).collect();
                format!("({})", parts.join(separator))
            }
        }
    }

    fn cond(&mut self, field: &Field, cond: &Cond) -> String {
        let f = field.sql;
        match cond {
            Cond::IsNull => format!("{f} IS NULL"),
            Cond::NotNull => format!("{f} IS NOT NULL"),
            Cond::Eq(value) => match field.doc_path {
                Some(path) => format!(
                    "{DOC_INDEXED} @> {}",
                    self.bind(Param::Json(nest(path, value.to_json())))
                ),
                None => format!("{f} = {}", self.bind(value.to_param())),
            },
            // Matches NULL too, like MongoDB's $ne matches absent fields.
            Cond::Ne(value) => format!("{f} IS DISTINCT FROM {}", self.bind(value.to_param())),
            Cond::Range(op, value) => format!("{f} {} {}", op.sql(), self.bind(value.to_param())),
            Cond::In { values, null_too } => match (values.is_empty(), null_too) {
                (true, _) => format!("{f} IS NULL"),
                (false, false) => format!("{f} = ANY({})", self.bind(array(field.ty, values))),
                (false, true) => format!("({f} = ANY({}) OR {f} IS NULL)", self.bind(array(field.ty, values))),
            },
            Cond::NotIn { values, null_too } => match (values.is_empty(), null_too) {
                (true, _) => format!("{f} IS NOT NULL"),
                (false, false) => format!("({f} IS NULL OR {f} <> ALL({}))", self.bind(array(field.ty, values))),
                (false, true) => format!(
                    "({f} IS NOT NULL AND {f} <> ALL({}))",
                    self.bind(array(field.ty, values))
                ),
            },
        }
    }

    /// Rows strictly after `after` in `sort`'s order. NULL keys come first
    /// when descending and last when ascending (see `Sort::order_by`); the
    /// row comparison alone would drop them, as `(NULL, id) < (...)` is NULL.
    fn keyset(&mut self, sort: Sort, after: &Position) -> String {
        let k = sort.field.sql();
        let id = Param::Text(after.id.clone());
        match (sort.descending, &after.key) {
            (true, Some(key)) => {
                let key = self.bind(key.to_param());
                format!("({k}, id) < ({key}, {})", self.bind(id))
            }
            (true, None) => format!("({k} IS NOT NULL OR id < {})", self.bind(id)),
            (false, Some(key)) => {
                let key = self.bind(key.to_param());
                format!("(({k}, id) > ({key}, {}) OR {k} IS NULL)", self.bind(id))
            }
            (false, None) => format!("({k} IS NULL AND id > {})", self.bind(id)),
        }
    }
}

fn array(ty: FieldType, values: &[Scalar]) -> Param {
    // The parser typed every value as `ty`, so the other arms never match.
    match ty {
        FieldType::Text => Param::TextArray(
            values
                .iter()
                .filter_map(|v| match v {
                    Scalar::Text(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        FieldType::Int => Param::IntArray(
            values
                .iter()
                .filter_map(|v| match v {
                    Scalar::Int(i) => Some(*i),
                    _ => None,
                })
                .collect(),
        ),
        FieldType::Time => Param::TimeArray(
            values
                .iter()
                .filter_map(|v| match v {
                    Scalar::Time(t) => Some(*t),
                    _ => None,
                })
                .collect(),
        ),
    }
}

/// `["payment", "status"]`, `"paid"` → `{"payment": {"status": "paid"}}`.
fn nest(path: &[&str], leaf: Value) -> Value {
    path.iter().rev().fold(leaf, |inner, key| {
        let mut object = Map::new();
        object.insert((*key).to_owned(), inner);
        Value::Object(object)
    })
}

// ---------------------------------------------------------------- sort

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortField {
    CreatedAt,
    UpdatedAt,
    TotalCents,
    Status,
}

impl SortField {
    const ALL: [SortField; 4] = [Self::CreatedAt, Self::UpdatedAt, Self::TotalCents, Self::Status];

    fn name(self) -> &'static str {
        match self {
            Self::CreatedAt => "created_at",
            Self::UpdatedAt => "updated_at",
            Self::TotalCents => "total_cents",
            Self::Status => "status",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Self::CreatedAt => "created_at",
            Self::UpdatedAt => "updated_at",
            Self::TotalCents => TOTAL_CENTS,
            Self::Status => "status",
        }
    }

    fn select_item(self) -> &'static str {
        match self {
            Self::CreatedAt => "created_at AS sort_key",
            Self::UpdatedAt => "updated_at AS sort_key",
            Self::TotalCents => "((doc->>'total_cents')::bigint) AS sort_key",
            Self::Status => "status AS sort_key",
        }
    }

    fn ty(self) -> FieldType {
        match self {
            Self::CreatedAt | Self::UpdatedAt => FieldType::Time,
            Self::TotalCents => FieldType::Int,
            Self::Status => FieldType::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sort {
    field: SortField,
    descending: bool,
}

impl Sort {
    const DEFAULT: Sort = Sort {
        field: SortField::CreatedAt,
        descending: true,
    };

    fn parse(sort: Option<&str>) -> Result<Sort, FilterError> {
        let Some(sort) = sort else {
            return Ok(Self::DEFAULT);
        };
        let (name, descending) = match sort.strip_prefix('-') {
            Some(name) => (name, true),
            None => (sort, false),
        };
        SortField::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .map(|field| Sort { field, descending })
            .ok_or_else(|| FilterError::BadSort(echo(sort)))
    }

    /// Spelled out with NULLS FIRST/LAST, Postgres' defaults for DESC/ASC,
    /// so the keyset condition and the `(created_at DESC, id DESC)` indexes
    /// agree with it.
    fn order_by(self) -> &'static str {
        match (self.field, self.descending) {
            (SortField::CreatedAt, true) => "created_at DESC NULLS FIRST, id DESC",
            (SortField::CreatedAt, false) => "created_at ASC NULLS LAST, id ASC",
            (SortField::UpdatedAt, true) => "updated_at DESC NULLS FIRST, id DESC",
            (SortField::UpdatedAt, false) => "updated_at ASC NULLS LAST, id ASC",
            (SortField::TotalCents, true) => "((doc->>'total_cents')::bigint) DESC NULLS FIRST, id DESC",
            (SortField::TotalCents, false) => "((doc->>'total_cents')::bigint) ASC NULLS LAST, id ASC",
            (SortField::Status, true) => "status DESC NULLS FIRST, id DESC",
            (SortField::Status, false) => "status ASC NULLS LAST, id ASC",
        }
    }
}

impl fmt::Display for Sort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.descending { "-" } else { "" };
        write!(f, "{sign}{}", self.field.name())
    }
}

fn parse_limit(limit: Option<&str>) -> Result<u32, FilterError> {
    let Some(limit) = limit else {
        return Ok(DEFAULT_LIMIT);
    };
    limit
        .parse::<u32>()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or(FilterError::BadLimit)
}

// ---------------------------------------------------------------- cursor

/// Where the previous page ended: its last row's sort key and id.
#[derive(Debug, Clone, PartialEq)]
struct Position {
    key: Option<Scalar>,
    id: String,
}

/// The cursor's JSON, before base64. Not signed: it only says where to
/// resume, and the handler's scope and the filter still apply to every row,
/// so a forged one can show nothing a filter could not.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorJson {
    /// The sort it was made for, as in the `sort` parameter.
    sort: String,
    key: Value,
    id: String,
}

fn encode_cursor(sort: Sort, position: &Position) -> String {
    let json = CursorJson {
        sort: sort.to_string(),
        key: position.key.as_ref().map_or(Value::Null, Scalar::to_json),
        id: position.id.clone(),
    };
    // Serializing a struct of strings and a Value cannot fail.
    let bytes = serde_json::to_vec(&json).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_cursor(cursor: &str, sort: Sort) -> Result<Position, FilterError> {
    if cursor.len() > MAX_CURSOR_BYTES {
        return Err(FilterError::BadCursor);
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| FilterError::BadCursor)?;
    let json: CursorJson = serde_json::from_slice(&bytes).map_err(|_| FilterError::BadCursor)?;
    let made_for = Sort::parse(Some(&json.sort)).map_err(|_| FilterError::BadCursor)?;
    if made_for != sort {
        return Err(FilterError::CursorSortMismatch {
            cursor: made_for.to_string(),
            requested: sort.to_string(),
        });
    }
    let key = match &json.key {
        Value::Null => None,
        key => Some(Scalar::parse(sort.field.ty(), key).ok_or(FilterError::BadCursor)?),
    };
    if json.id.contains('\0') {
        return Err(FilterError::BadCursor);
    }
    Ok(Position { key, id: json.id })
}

fn position_of(row: &PgRow, sort: Sort) -> Result<Position, sqlx::Error> {
    let key = match sort.field.ty() {
        FieldType::Text => row.try_get::<Option<String>, _>("sort_key")?.map(Scalar::Text),
        FieldType::Int => row.try_get::<Option<i64>, _>("sort_key")?.map(Scalar::Int),
        FieldType::Time => row.try_get::<Option<DateTime<Utc>>, _>("sort_key")?.map(Scalar::Time),
    };
    Ok(Position {
        key,
        id: row.try_get("id")?,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn params(filter: Option<&str>, sort: Option<&str>, limit: Option<&str>, cursor: Option<&str>) -> ListParams {
        ListParams {
            filter: filter.map(str::to_owned),
            sort: sort.map(str::to_owned),
            limit: limit.map(str::to_owned),
            cursor: cursor.map(str::to_owned),
        }
    }

    fn with_filter(filter: &Value) -> Result<OrderQuery, FilterError> {
        OrderQuery::parse(&params(Some(&filter.to_string()), None, None, None))
    }

    /// The WHERE expression and parameters of a filter, numbered from $1.
    fn sql(filter: Value) -> (String, Vec<Param>) {
        let sql = with_filter(&filter)
            .unwrap_or_else(|e| panic!("{filter} refused: {e:?}"))
            .to_sql(0);
        (sql.where_sql, sql.params)
    }

    fn err(filter: Value) -> FilterError {
        match with_filter(&filter) {
            Ok(q) => panic!("{filter} accepted: {}", q.to_sql(0).where_sql),
            Err(e) => e,
        }
    }

    fn time(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test timestamp")
            .with_timezone(&Utc)
    }

    fn text(s: &str) -> Param {
        Param::Text(s.to_owned())
    }

    // ------------------------------------------------------------ shape

    #[test]
    fn no_filter_and_empty_filter_match_everything() {
        let none = OrderQuery::parse(&ListParams::default())
            .expect("no parameters")
            .to_sql(0);
        assert_eq!(none.where_sql, "TRUE");
        assert!(none.params.is_empty());
        assert_eq!(sql(json!({})), ("TRUE".to_owned(), vec![]));
    }

    #[test]
    fn equality_on_columns_compares_the_column() {
        assert_eq!(
            sql(json!({"status": "paid"})),
            ("status = $1".to_owned(), vec![text("paid")])
        );
        assert_eq!(
            sql(json!({"user_id": "u1"})),
            ("user_id = $1".to_owned(), vec![text("u1")])
        );
        assert_eq!(
            sql(json!({"version": 3})),
            ("version = $1".to_owned(), vec![Param::Int(3)])
        );
        let t = "2026-11-21T10:00:00Z";
        assert_eq!(
            sql(json!({"created_at": t})),
            ("created_at = $1".to_owned(), vec![Param::Time(time(t))])
        );
    }

    #[test]
    fn equality_on_document_fields_is_containment_so_the_gin_index_serves_it() {
        assert_eq!(
            sql(json!({"kind": "goods"})),
            (
                "(doc - 'items' - 'history') @> $1".to_owned(),
                vec![Param::Json(json!({"kind": "goods"}))]
            )
        );
        assert_eq!(
            sql(json!({"total_cents": 1500})),
            (
                "(doc - 'items' - 'history') @> $1".to_owned(),
                vec![Param::Json(json!({"total_cents": 1500}))]
            )
        );
        assert_eq!(
            sql(json!({"payment.status": "succeeded"})),
            (
                "(doc - 'items' - 'history') @> $1".to_owned(),
                vec![Param::Json(json!({"payment": {"status": "succeeded"}}))]
            )
        );
        assert_eq!(
            sql(json!({"rejection.code": {"$eq": "sold_out"}})),
            (
                "(doc - 'items' - 'history') @> $1".to_owned(),
                vec![Param::Json(json!({"rejection": {"code": "sold_out"}}))]
            )
        );
    }

    #[test]
    fn every_operator_on_every_field_type() {
        let t = "2026-11-21T10:00:00+02:00";
        let cases = [
            ("status", "status", json!("paid"), text("paid")),
            ("kind", "(doc->>'kind')", json!("goods"), text("goods")),
            (
                "payment.payment_id",
                "(doc#>>'{payment,payment_id}')",
                json!("p"),
                text("p"),
            ),
            ("version", "version", json!(7), Param::Int(7)),
            (
                "total_cents",
                "((doc->>'total_cents')::bigint)",
                json!(-5),
                Param::Int(-5),
            ),
            (
                "payment.amount_cents",
                "((doc#>>'{payment,amount_cents}')::bigint)",
                json!(9),
                Param::Int(9),
            ),
            ("created_at", "created_at", json!(t), Param::Time(time(t))),
            ("updated_at", "updated_at", json!(t), Param::Time(time(t))),
        ];
        for (name, expr, value, param) in cases {
            for (op, sql_op) in [("$gt", ">"), ("$gte", ">="), ("$lt", "<"), ("$lte", "<=")] {
                assert_eq!(
                    sql(json!({name: {op: value}})),
                    (format!("{expr} {sql_op} $1"), vec![param.clone()]),
                    "{name} {op}"
                );
            }
            assert_eq!(
                sql(json!({name: {"$ne": value}})),
                (format!("{expr} IS DISTINCT FROM $1"), vec![param.clone()]),
                "{name} $ne"
            );
            let array = match &param {
                Param::Text(v) => Param::TextArray(vec![v.clone()]),
                Param::Int(v) => Param::IntArray(vec![*v]),
                Param::Time(v) => Param::TimeArray(vec![*v]),
                other => unreachable!("{other:?}"),
            };
            assert_eq!(
                sql(json!({name: {"$in": [value]}})),
                (format!("{expr} = ANY($1)"), vec![array.clone()]),
                "{name} $in"
            );
            assert_eq!(
                sql(json!({name: {"$nin": [value]}})),
                (format!("({expr} IS NULL OR {expr} <> ALL($1))"), vec![array]),
                "{name} $nin"
            );
            assert_eq!(
                sql(json!({name: {"$exists": true}})),
                (format!("{expr} IS NOT NULL"), vec![])
            );
            assert_eq!(
                sql(json!({name: {"$exists": false}})),
                (format!("{expr} IS NULL"), vec![])
            );
            // $eq: a column compares with `=`, a document field by containment
            let (eq_sql, eq_params) = sql(json!({name: {"$eq": value}}));
            let field = field(name).expect("whitelisted");
            match field.doc_path {
                None => assert_eq!((eq_sql, eq_params), (format!("{expr} = $1"), vec![param.clone()])),
                Some(_) => {
                    assert_eq!(eq_sql, "(doc - 'items' - 'history') @> $1");
                    assert!(matches!(eq_params.as_slice(), [Param::Json(_)]), "{name}");
                }
            }
        }
    }

    #[test]
    fn in_lists_bind_one_array_of_all_values() {
        assert_eq!(
            sql(json!({"status": {"$in": ["paid", "preparing", "completed"]}})),
            (
                "status = ANY($1)".to_owned(),
                vec![Param::TextArray(vec![
                    "paid".into(),
                    "preparing".into(),
                    "completed".into()
                ])]
            )
        );
        assert_eq!(
            sql(json!({"total_cents": {"$nin": [100, 200]}})),
            (
                "(((doc->>'total_cents')::bigint) IS NULL OR ((doc->>'total_cents')::bigint) <> ALL($1))".to_owned(),
                vec![Param::IntArray(vec![100, 200])]
            )
        );
    }

    #[test]
    fn several_operators_on_one_field_are_anded() {
        assert_eq!(
            sql(json!({"total_cents": {"$gte": 100, "$lt": 500}})),
            (
                "(((doc->>'total_cents')::bigint) >= $1 AND ((doc->>'total_cents')::bigint) < $2)".to_owned(),
                vec![Param::Int(100), Param::Int(500)]
            )
        );
    }

    #[test]
    fn several_fields_in_one_object_are_anded() {
        // keys in alphabetical order: the SQL follows the object's key order
        assert_eq!(
            sql(json!({"kind": "goods", "status": "paid", "user_id": "u1"})),
            (
                "((doc - 'items' - 'history') @> $1 AND status = $2 AND user_id = $3)".to_owned(),
                vec![Param::Json(json!({"kind": "goods"})), text("paid"), text("u1")]
            )
        );
    }

    #[test]
    fn and_or_nest_with_parentheses() {
        assert_eq!(
            sql(json!({"$or": [{"status": "paid"}, {"status": "completed"}]})),
            (
                "(status = $1 OR status = $2)".to_owned(),
                vec![text("paid"), text("completed")]
            )
        );
        assert_eq!(
            sql(json!({
                "$and": [
                    {"$or": [{"status": "paid"}, {"total_cents": {"$gt": 1000}}]},
                    {"$or": [{"user_id": "u1"}, {"coupon_id": null}]}
                ],
                "version": {"$gte": 2}
            })),
            (
                "(((status = $1 OR ((doc->>'total_cents')::bigint) > $2) AND (user_id = $3 OR (doc->>'coupon_id') IS NULL)) AND version >= $4)"
                    .to_owned(),
                vec![text("paid"), Param::Int(1000), text("u1"), Param::Int(2)]
            )
        );
        // one-element lists and an object with several fields inside $or
        assert_eq!(
            sql(json!({"$and": [{"status": "paid"}]})),
            ("status = $1".to_owned(), vec![text("paid")])
        );
        assert_eq!(
            sql(json!({"$or": [{"status": "paid", "user_id": "u1"}, {"version": 1}]})),
            (
                "((status = $1 AND user_id = $2) OR version = $3)".to_owned(),
                vec![text("paid"), text("u1"), Param::Int(1)]
            )
        );
    }

    #[test]
    fn null_means_absent_or_null() {
        assert_eq!(sql(json!({"coupon_id": null})).0, "(doc->>'coupon_id') IS NULL");
        assert_eq!(
            sql(json!({"coupon_id": {"$eq": null}})).0,
            "(doc->>'coupon_id') IS NULL"
        );
        assert_eq!(
            sql(json!({"coupon_id": {"$ne": null}})).0,
            "(doc->>'coupon_id') IS NOT NULL"
        );
        assert_eq!(sql(json!({"status": null})).0, "status IS NULL");
        assert_eq!(
            sql(json!({"payment.status": {"$exists": false}})).0,
            "(doc#>>'{payment,status}') IS NULL"
        );
        assert_eq!(
            sql(json!({"voucher_id": {"$in": ["v1", null]}})),
            (
                "((doc->>'voucher_id') = ANY($1) OR (doc->>'voucher_id') IS NULL)".to_owned(),
                vec![Param::TextArray(vec!["v1".into()])]
            )
        );
        assert_eq!(
            sql(json!({"voucher_id": {"$nin": ["v1", null]}})),
            (
                "((doc->>'voucher_id') IS NOT NULL AND (doc->>'voucher_id') <> ALL($1))".to_owned(),
                vec![Param::TextArray(vec!["v1".into()])]
            )
        );
        assert_eq!(
            sql(json!({"voucher_id": {"$in": [null]}})).0,
            "(doc->>'voucher_id') IS NULL"
        );
        assert_eq!(
            sql(json!({"voucher_id": {"$nin": [null]}})).0,
            "(doc->>'voucher_id') IS NOT NULL"
        );
        for op in ["$gt", "$gte", "$lt", "$lte"] {
            assert!(
                matches!(
                    err(json!({"total_cents": {op: null}})),
                    FilterError::TypeMismatch { .. }
                ),
                "{op}"
            );
        }
    }

    #[test]
    fn params_are_numbered_after_the_callers_own() {
        let query = with_filter(&json!({"status": "paid", "total_cents": {"$in": [1, 2]}})).expect("valid");
        let sql = query.to_sql(2);
        assert_eq!(
            sql.where_sql,
            "(status = $3 AND ((doc->>'total_cents')::bigint) = ANY($4))"
        );
        assert_eq!(sql.params, vec![text("paid"), Param::IntArray(vec![1, 2])]);
    }

    #[test]
    fn statement_puts_scope_filter_order_and_lookahead_limit_together() {
        let query = OrderQuery::parse(&params(
            Some(r#"{"status":"paid"}"#),
            Some("total_cents"),
            Some("10"),
            None,
        ))
        .expect("valid");
        assert_eq!(query.limit(), 10);
        let sql = query.to_sql(1);
        assert_eq!(sql.fetch_limit, 11);
        assert_eq!(
            sql.statement(Some("user_id = $1")),
            "SELECT id, doc, ((doc->>'total_cents')::bigint) AS sort_key FROM order_view \
             WHERE (user_id = $1) AND (status = $2) \
             ORDER BY ((doc->>'total_cents')::bigint) ASC NULLS LAST, id ASC LIMIT 11"
        );
        assert_eq!(
            OrderQuery::parse(&ListParams::default())
                .expect("defaults")
                .to_sql(0)
                .statement(None),
            "SELECT id, doc, created_at AS sort_key FROM order_view WHERE (TRUE) \
             ORDER BY created_at DESC NULLS FIRST, id DESC LIMIT 51"
        );
    }

    // ------------------------------------------------------------ refusals

    #[test]
    fn values_of_the_wrong_type_are_refused() {
        let cases = [
            json!({"total_cents": "100"}),
            json!({"total_cents": 1.5}),
            json!({"total_cents": 1.0}),
            json!({"total_cents": 1e3}),
            json!({"total_cents": 18446744073709551615_u64}),
            json!({"total_cents": true}),
            json!({"version": {"$gt": "1"}}),
            json!({"status": 1}),
            json!({"status": true}),
            json!({"status": ["paid"]}),
            json!({"status": {}}),
            json!({"status": {"paid": 1}}),
            json!({"status": "nul\u{0}byte"}),
            json!({"created_at": "yesterday"}),
            json!({"created_at": "2026-11-21"}),
            json!({"created_at": "2026-11-21 10:00:00"}),
            json!({"created_at": 1_700_000_000}),
            json!({"updated_at": {"$lt": null}}),
            json!({"status": {"$in": ["paid", 1]}}),
            json!({"total_cents": {"$nin": [1, "2"]}}),
            json!({"created_at": {"$in": ["2026-11-21T10:00:00Z", "soon"]}}),
            json!({"payment.amount_cents": {"$gte": 0.5}}),
        ];
        for filter in cases {
            assert!(
                matches!(err(filter.clone()), FilterError::TypeMismatch { .. }),
                "{filter}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        for name in [
            "id",
            "doc",
            "payment",
            "items",
            "history",
            "payment.",
            "Status",
            "payment.status.x",
            "",
        ] {
            assert_eq!(
                err(json!({name: "x"})),
                FilterError::UnknownField(name.to_owned()),
                "{name}"
            );
        }
        // inside $or too, and with operators
        assert_eq!(
            err(json!({"$or": [{"status": "paid"}, {"items": {"$exists": true}}]})),
            FilterError::UnknownField("items".to_owned())
        );
    }

    #[test]
    fn unsupported_operators_are_refused() {
        for op in [
            "$where",
            "$regex",
            "$expr",
            "$not",
            "$nor",
            "$text",
            "$elemMatch",
            "$size",
            "$type",
            "$all",
        ] {
            assert_eq!(
                err(json!({"status": {op: "x"}})),
                FilterError::UnknownOperator(op.to_owned()),
                "{op}"
            );
        }
        for op in ["$where", "$expr", "$nor", "$comment", "$"] {
            assert_eq!(
                err(json!({op: "1"})),
                FilterError::UnknownOperator(op.to_owned()),
                "{op}"
            );
        }
        // $and/$or only at the top of a filter object, not as field operators
        assert_eq!(
            err(json!({"status": {"$or": [{"$eq": "a"}]}})),
            FilterError::UnknownOperator("$or".to_owned())
        );
        // an operator object with a plain key mixed in
        assert_eq!(
            err(json!({"status": {"$eq": "paid", "x": 1}})),
            FilterError::UnknownOperator("x".to_owned())
        );
    }

    #[test]
    fn malformed_filters_are_refused() {
        let parse = |f: &str| OrderQuery::parse(&params(Some(f), None, None, None));
        for f in ["", "{", "status=paid", "{\"status\": 'paid'}", "{} {}"] {
            assert!(matches!(parse(f), Err(FilterError::MalformedJson(_))), "{f}");
        }
        for f in ["null", "[]", "[{\"status\":\"paid\"}]", "\"status\"", "1"] {
            assert_eq!(parse(f), Err(FilterError::NotAnObject), "{f}");
        }
        let bad_list = |operator| FilterError::BadOperand {
            operator,
            expected: "a non-empty array of filter objects",
        };
        assert_eq!(err(json!({"$and": []})), bad_list("$and"));
        assert_eq!(err(json!({"$or": {"status": "paid"}})), bad_list("$or"));
        assert_eq!(err(json!({"$or": ["status"]})), bad_list("$or"));
        assert_eq!(err(json!({"$and": [[{"status": "paid"}]]})), bad_list("$and"));
        assert!(matches!(
            err(json!({"status": {"$in": []}})),
            FilterError::BadOperand { operator: "$in", .. }
        ));
        assert!(matches!(
            err(json!({"status": {"$nin": "paid"}})),
            FilterError::BadOperand { operator: "$nin", .. }
        ));
        assert!(matches!(
            err(json!({"status": {"$exists": 1}})),
            FilterError::BadOperand {
                operator: "$exists",
                ..
            }
        ));
        assert!(matches!(
            err(json!({"status": {"$exists": "true"}})),
            FilterError::BadOperand {
                operator: "$exists",
                ..
            }
        ));
    }

    #[test]
    fn size_depth_condition_and_list_limits() {
        // size
        let big = format!(r#"{{"status": "{}"}}"#, "x".repeat(MAX_FILTER_BYTES));
        assert_eq!(
            OrderQuery::parse(&params(Some(&big), None, None, None)),
            Err(FilterError::TooLarge)
        );
        let just_fits = format!(r#"{{"status":"{}"}}"#, "x".repeat(MAX_FILTER_BYTES - 13));
        assert_eq!(just_fits.len(), MAX_FILTER_BYTES);
        assert!(OrderQuery::parse(&params(Some(&just_fits), None, None, None)).is_ok());

        // depth: the top object is level 1, each $and/$or one more
        let nested = |levels: usize| {
            (1..levels).fold(json!({"status": "paid"}), |inner, i| {
                if i % 2 == 0 {
                    json!({"$and": [inner]})
                } else {
                    json!({"$or": [inner, {"version": 1}]})
                }
            })
        };
        assert!(with_filter(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(err(nested(MAX_DEPTH + 1)), FilterError::TooDeep);

        // conditions: every operator counts, wherever it is
        let conditions = |n: usize| {
            let ors: Vec<Value> = (0..n).map(|i| json!({"version": {"$ne": i}})).collect();
            json!({"$or": ors})
        };
        assert!(with_filter(&conditions(MAX_CONDITIONS)).is_ok());
        assert_eq!(err(conditions(MAX_CONDITIONS + 1)), FilterError::TooManyConditions);
        let ops = json!({"$or": (0..MAX_CONDITIONS / 2).map(|_| json!({"version": {"$gt": 1, "$lt": 9}})).collect::<Vec<_>>(), "status": "paid"});
        assert_eq!(err(ops), FilterError::TooManyConditions);

        // values per $in/$nin
        let values = |n: i64| (0..n).collect::<Vec<i64>>();
        let (_, params) = sql(json!({"version": {"$in": values(MAX_IN_VALUES as i64)}}));
        assert_eq!(params, vec![Param::IntArray(values(MAX_IN_VALUES as i64))]);
        assert_eq!(
            err(json!({"version": {"$nin": values(MAX_IN_VALUES as i64 + 1)}})),
            FilterError::TooManyValues { operator: "$nin" }
        );
    }

    // ------------------------------------------------------------ injection

    #[test]
    fn injection_in_field_names_is_refused_and_never_reaches_sql() {
        let names = [
            "status; DROP TABLE order_view",
            "doc->>'x'",
            "a') OR 1=1 --",
            "status = status OR TRUE",
            "payment.status') OR ('1'='1",
            "\"status\"",
            "status\u{0}",
        ];
        for name in names {
            for filter in [
                json!({name: "x"}),
                json!({name: {"$exists": true}}),
                json!({"$or": [{name: 1}]}),
            ] {
                assert_eq!(err(filter), FilterError::UnknownField(name.to_owned()), "{name}");
            }
        }
        // as operators too
        for op in ["$eq; DROP TABLE order_view", "$gt') OR 1=1 --"] {
            assert!(matches!(
                err(json!({"status": {op: "x"}})),
                FilterError::UnknownOperator(_)
            ));
            assert!(matches!(err(json!({op: "x"})), FilterError::UnknownOperator(_)));
        }
    }

    #[test]
    fn injection_in_values_is_only_ever_a_bound_parameter() {
        let evil = [
            "x' OR '1'='1",
            "'; DROP TABLE order_view; --",
            "$2); DROP TABLE order_view; --",
            "paid') OR TRUE --",
            "\\'; SELECT pg_sleep(10); --",
        ];
        for value in evil {
            let filters = [
                json!({"status": value}),
                json!({"kind": value}),
                json!({"payment.status": {"$ne": value}}),
                json!({"user_id": {"$in": [value, "u1"]}}),
                json!({"$or": [{"coupon_id": {"$gt": value}}, {"rejection.code": {"$nin": [value]}}]}),
            ];
            for filter in filters {
                let (where_sql, params) = sql(filter.clone());
                assert!(!where_sql.contains(value), "{where_sql}");
                assert!(params.iter().any(|p| binds(p, value)), "{filter}: {params:?}");
            }
        }
        fn binds(param: &Param, value: &str) -> bool {
            match param {
                Param::Text(v) => v == value,
                Param::TextArray(vs) => vs.iter().any(|v| v == value),
                Param::Json(json) => json.to_string().contains(&Value::from(value).to_string()),
                _ => false,
            }
        }
        // the SQL of a filter depends only on its shape, never on its values
        let shape = |v: &str| sql(json!({"status": {"$in": [v]}, "total_cents": {"$gt": 1}})).0;
        assert_eq!(shape("x' OR '1'='1"), shape("paid"));
    }

    #[test]
    fn long_unknown_names_are_echoed_shortened() {
        let long = "x".repeat(1000);
        let FilterError::UnknownField(echoed) = err(json!({long.as_str(): 1})) else {
            panic!("not UnknownField");
        };
        assert_eq!(echoed.chars().count(), MAX_ECHO_CHARS + 1);
        // cut on a character boundary
        let FilterError::UnknownField(echoed) = err(json!({"é".repeat(100): 1})) else {
            panic!("not UnknownField");
        };
        assert!(echoed.starts_with(&"é".repeat(MAX_ECHO_CHARS)));
    }

    // ------------------------------------------------------------ sort and limit

    #[test]
    fn sort_parsing() {
        assert_eq!(Sort::parse(None), Ok(Sort::DEFAULT));
        assert_eq!(Sort::DEFAULT.to_string(), "-created_at");
        for field in SortField::ALL {
            let name = field.name();
            assert_eq!(
                Sort::parse(Some(name)),
                Ok(Sort {
                    field,
                    descending: false
                })
            );
            let desc = Sort::parse(Some(&format!("-{name}"))).expect("descending");
            assert_eq!(
                desc,
                Sort {
                    field,
                    descending: true
                }
            );
            assert_eq!(desc.to_string(), format!("-{name}"));
            assert!(desc.order_by().ends_with(", id DESC"), "{}", desc.order_by());
        }
        for bad in [
            "",
            "-",
            "--created_at",
            "+created_at",
            "id",
            "kind",
            "created_at,id",
            "created_at DESC",
            " status",
        ] {
            assert_eq!(
                Sort::parse(Some(bad)),
                Err(FilterError::BadSort(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn order_by_ends_with_id_in_the_same_direction_and_keys_match_the_fields() {
        for field in SortField::ALL {
            for descending in [true, false] {
                let sort = Sort { field, descending };
                let dir = if descending { "DESC" } else { "ASC" };
                let nulls = if descending { "NULLS FIRST" } else { "NULLS LAST" };
                assert_eq!(sort.order_by(), format!("{} {dir} {nulls}, id {dir}", field.sql()));
                assert_eq!(field.select_item(), format!("{} AS sort_key", field.sql()));
                // the sort key is the filter field of the same name
                let f = super::field(field.name()).expect("sortable fields are filterable");
                assert_eq!((f.sql, f.ty), (field.sql(), field.ty()));
            }
        }
    }

    #[test]
    fn limit_bounds() {
        assert_eq!(parse_limit(None), Ok(DEFAULT_LIMIT));
        assert_eq!(parse_limit(Some("1")), Ok(1));
        assert_eq!(parse_limit(Some("200")), Ok(MAX_LIMIT));
        for bad in ["0", "201", "-1", "", "abc", "1.5", "1e2", "99999999999", " 5"] {
            assert_eq!(parse_limit(Some(bad)), Err(FilterError::BadLimit), "{bad:?}");
        }
        assert_eq!(
            OrderQuery::parse(&params(None, None, Some("0"), None)),
            Err(FilterError::BadLimit)
        );
    }

    // ------------------------------------------------------------ cursor

    fn sort(s: &str) -> Sort {
        Sort::parse(Some(s)).expect("test sort")
    }

    #[test]
    fn cursor_round_trips_for_every_key_type_and_null() {
        let cases = [
            ("-created_at", Some(Scalar::Time(time("2026-11-21T10:00:00.123456Z")))),
            ("updated_at", Some(Scalar::Time(time("2026-11-21T10:00:00Z")))),
            ("total_cents", Some(Scalar::Int(i64::MIN))),
            ("-total_cents", None),
            ("status", Some(Scalar::Text("pending_payment".into()))),
            ("-status", Some(Scalar::Text("ünïcödé ' \" \\".into()))),
        ];
        for (s, key) in cases {
            let position = Position {
                key,
                id: "0199a8f1-0000-7000-8000-000000000001".into(),
            };
            let cursor = encode_cursor(sort(s), &position);
            assert!(
                cursor
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{cursor}"
            );
            assert_eq!(decode_cursor(&cursor, sort(s)), Ok(position), "{s}");
        }
    }

    #[test]
    fn cursor_for_another_sort_is_refused() {
        let position = Position {
            key: Some(Scalar::Int(5)),
            id: "o1".into(),
        };
        let cursor = encode_cursor(sort("-total_cents"), &position);
        assert_eq!(
            decode_cursor(&cursor, sort("total_cents")),
            Err(FilterError::CursorSortMismatch {
                cursor: "-total_cents".into(),
                requested: "total_cents".into()
            })
        );
        let default = OrderQuery::parse(&params(None, None, None, Some(&cursor)));
        assert!(matches!(default, Err(FilterError::CursorSortMismatch { .. })));
        assert!(OrderQuery::parse(&params(None, Some("-total_cents"), None, Some(&cursor))).is_ok());
    }

    #[test]
    fn tampered_cursors_are_refused() {
        let b64 = |json: Value| URL_SAFE_NO_PAD.encode(json.to_string());
        let good = encode_cursor(
            Sort::DEFAULT,
            &Position {
                key: Some(Scalar::Time(time("2026-11-21T10:00:00Z"))),
                id: "o1".into(),
            },
        );
        let cases = [
            String::new(),
            "not a cursor!".to_owned(),
            good[..good.len() - 3].to_owned(),
            format!("{good}="),
            format!("{good}AAAA"),
            good.replace('e', "f"),
            "x".repeat(MAX_CURSOR_BYTES + 1),
            URL_SAFE_NO_PAD.encode("not json"),
            b64(json!([1, 2])),
            b64(json!({"sort": "-created_at", "key": "2026-11-21T10:00:00Z"})),
            b64(json!({"sort": "-created_at", "key": "2026-11-21T10:00:00Z", "id": "o1", "extra": 1})),
            b64(json!({"sort": "-created_at", "key": "yesterday", "id": "o1"})),
            b64(json!({"sort": "-created_at", "key": 17, "id": "o1"})),
            b64(json!({"sort": "-created_at", "key": "2026-11-21T10:00:00Z", "id": 1})),
            b64(json!({"sort": "-created_at", "key": "2026-11-21T10:00:00Z", "id": "o\u{0}1"})),
            b64(json!({"sort": "-id", "key": "2026-11-21T10:00:00Z", "id": "o1"})),
            b64(json!({"sort": "-created_at; DROP TABLE order_view", "key": null, "id": "o1"})),
        ];
        for cursor in cases {
            assert_eq!(
                decode_cursor(&cursor, Sort::DEFAULT),
                Err(FilterError::BadCursor),
                "{cursor:?}"
            );
        }
        let wrong_type = b64(json!({"sort": "total_cents", "key": "100", "id": "o1"}));
        assert_eq!(
            decode_cursor(&wrong_type, sort("total_cents")),
            Err(FilterError::BadCursor)
        );
        let float = b64(json!({"sort": "total_cents", "key": 1.5, "id": "o1"}));
        assert_eq!(decode_cursor(&float, sort("total_cents")), Err(FilterError::BadCursor));
    }

    #[test]
    fn cursor_adds_a_keyset_condition_with_bound_values() {
        let t = time("2026-11-21T10:00:00Z");
        let keyset = |s: &str, key: Option<Scalar>, filter: Option<&str>, before: usize| {
            let cursor = encode_cursor(sort(s), &Position { key, id: "o5".into() });
            let sql = OrderQuery::parse(&params(filter, Some(s), None, Some(&cursor)))
                .expect("valid")
                .to_sql(before);
            (sql.where_sql, sql.params)
        };
        assert_eq!(
            keyset("-created_at", Some(Scalar::Time(t)), None, 0),
            (
                "(created_at, id) < ($1, $2)".to_owned(),
                vec![Param::Time(t), text("o5")]
            )
        );
        assert_eq!(
            keyset("created_at", Some(Scalar::Time(t)), None, 0),
            (
                "((created_at, id) > ($1, $2) OR created_at IS NULL)".to_owned(),
                vec![Param::Time(t), text("o5")]
            )
        );
        assert_eq!(
            keyset("-total_cents", None, None, 0),
            (
                "(((doc->>'total_cents')::bigint) IS NOT NULL OR id < $1)".to_owned(),
                vec![text("o5")]
            )
        );
        assert_eq!(
            keyset("status", None, None, 0),
            ("(status IS NULL AND id > $1)".to_owned(), vec![text("o5")])
        );
        assert_eq!(
            keyset(
                "-status",
                Some(Scalar::Text("paid".into())),
                Some(r#"{"kind":"goods"}"#),
                1
            ),
            (
                "(doc - 'items' - 'history') @> $2 AND (status, id) < ($3, $4)".to_owned(),
                vec![Param::Json(json!({"kind": "goods"})), text("paid"), text("o5")]
            )
        );
    }

    #[test]
    fn error_codes_name_the_parameter() {
        let cases = [
            (FilterError::TooLarge, "invalid_filter"),
            (FilterError::MalformedJson(String::new()), "invalid_filter"),
            (FilterError::NotAnObject, "invalid_filter"),
            (FilterError::UnknownField("x".into()), "invalid_filter"),
            (FilterError::UnknownOperator("$x".into()), "invalid_filter"),
            (
                FilterError::TypeMismatch {
                    field: "status",
                    expected: "a string",
                },
                "invalid_filter",
            ),
            (
                FilterError::BadOperand {
                    operator: "$in",
                    expected: "",
                },
                "invalid_filter",
            ),
            (FilterError::TooManyValues { operator: "$in" }, "invalid_filter"),
            (FilterError::TooDeep, "invalid_filter"),
            (FilterError::TooManyConditions, "invalid_filter"),
            (FilterError::BadLimit, "invalid_limit"),
            (FilterError::BadSort("x".into()), "invalid_sort"),
            (FilterError::BadCursor, "invalid_cursor"),
            (
                FilterError::CursorSortMismatch {
                    cursor: "a".into(),
                    requested: "b".into(),
                },
                "invalid_cursor",
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error:?}");
        }
    }

    #[test]
    fn whitelist_is_consistent() {
        for (i, f) in FIELDS.iter().enumerate() {
            assert!(FIELDS[..i].iter().all(|g| g.name != f.name), "duplicate {}", f.name);
            // timestamps in the document are strings; containment would compare their spelling
            assert!(f.ty != FieldType::Time || f.doc_path.is_none(), "{}", f.name);
            if let Some(path) = f.doc_path {
                assert_eq!(path.join("."), f.name);
            }
        }
    }
}
