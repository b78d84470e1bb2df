//! Read-model routes beyond a single order: a customer's orders (paged,
//! newest first) and daily sales. Tenant from the key, as everywhere.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use sluice_projections::store::QueryError;
use tracing::warn;

use crate::problem::Problem;
use crate::routes::authenticate_read;
use crate::AppState;

/// Most days one `/sales/daily` request may span.
const MAX_DAYS: i64 = 366;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Orders per page (1 to 500, default 50).
    pub limit: Option<i32>,
    /// `next_cursor` of the previous page: opaque, and good only for this
    /// tenant's listing of this customer.
    pub cursor: Option<String>,
}

/// A customer's orders, newest first
#[utoipa::path(
    get,
    path = "/customers/{customer_id}/orders",
    tag = "reads",
    security(("bearer" = [])),
    params(("customer_id" = String, Path), PageParams),
    responses(
        (status = 200, description = "One page: `items` and `next_cursor` (null on the last page).", body = crate::openapi::CustomerOrdersDoc),
        (status = 400, description = "A limit out of range or not a number, or a cursor this API did not hand out.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The read store is unavailable.", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64))),
    )
)]
pub async fn customer_orders(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(customer_id): Path<String>,
    page: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let caller = authenticate_read(&state, &headers)?;
    // A problem document like every other refusal, not axum's plain text.
    let Query(page) = page.map_err(|e| {
        Problem::malformed(format!(
            "the query string does not fit: limit is a whole number from 1 to 500, cursor a string ({})",
            e.body_text()
        ))
    })?;
    let limit = page.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Problem::malformed("limit must be between 1 and 500"));
    }
    let bad_cursor = || Problem::malformed("cursor is not one this API handed out for this listing");
    let inner = match page.cursor.as_deref() {
        Some(cursor) => Some(state.cursors.open(&caller.tenant, &customer_id, cursor).ok_or_else(bad_cursor)?),
        None => None,
    };
    let mut page =
        state.reads.customer_orders(&caller.tenant, &customer_id, limit, inner).await.map_err(|e| match e {
            QueryError::BadCursor => bad_cursor(),
            QueryError::Store(e) => {
                warn!(error = %e, "customer orders read failed");
                Problem::unavailable("the read store is unavailable")
            }
        })?;
    page.next_cursor = page.next_cursor.map(|inner| state.cursors.sign(&caller.tenant, &customer_id, &inner));
    Ok(Json(page).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DayRange {
    /// First day, `YYYY-MM-DD` (UTC).
    pub from: String,
    /// Last day, `YYYY-MM-DD` (UTC), at most 366 days after `from`.
    pub to: String,
}

/// Orders and sales per day
#[utoipa::path(
    get,
    path = "/sales/daily",
    tag = "reads",
    security(("bearer" = [])),
    params(DayRange),
    responses(
        (status = 200, description = "One entry per day: `day`, `orders`, `total_cents` (cancellations subtract on their day).", body = crate::openapi::DailySalesDoc),
        (status = 400, description = "Missing or malformed dates, or a range over 366 days.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The read store is unavailable.", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64))),
    )
)]
pub async fn daily_sales(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    range: Result<Query<DayRange>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let caller = authenticate_read(&state, &headers)?;
    let Query(range) = range.map_err(|_| Problem::malformed("give from=YYYY-MM-DD&to=YYYY-MM-DD"))?;
    let day = |name: &str, s: &str| {
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc().timestamp_millis())
            .map_err(|_| Problem::malformed(format!("{name} must be a date YYYY-MM-DD, not {s:?}")))
    };
    let (from, to) = (day("from", &range.from)?, day("to", &range.to)?);
    if to < from {
        return Err(Problem::malformed("to is before from"));
    }
    if (to - from) / 86_400_000 >= MAX_DAYS {
        return Err(Problem::malformed(format!("a range spans at most {MAX_DAYS} days")));
    }
    let days = state.reads.daily_sales(&caller.tenant, from, to).await.map_err(|e| {
        warn!(error = %e, "daily sales read failed");
        Problem::unavailable("the read store is unavailable")
    })?;
    Ok(Json(json!({"days": days})).into_response())
}
