//! The identity tables in PostgreSQL, shared by several replicas.

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;

use super::{Consumed, IdentityRecord, NewEnrollment, TokenRow};
use crate::enroll::EnrollError;
use crate::model::now_ms;
use crate::store::StoreError;
use crate::store::postgres::{pg, pool_err};

/// The first key of the advisory locks on agent names ("id" in ASCII);
/// the second is the name's hash.
const NAME_LOCK: i32 = 0x6964;

const COLS: &str = "name, pool, labels, enrollment_id, cert_not_after_ms, revoked_ms";

async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(pool_err("take a connection"))
}

/// Takes the transaction-scoped lock on agent `name`: enrolments and
/// revocations of one name run one at a time across replicas.
async fn lock_name<C: GenericClient + Sync>(c: &C, name: &str) -> Result<(), StoreError> {
    c.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&NAME_LOCK, &name],
    )
    .await
    .map_err(pg("lock agent name"))?;
    Ok(())
}

pub(super) async fn list(pool: &Pool) -> Result<Vec<IdentityRecord>, StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    let sql = format!("SELECT {COLS} FROM agent_identities ORDER BY name");
    let rows = c
        .query(sql.as_str(), &[])
        .await
        .map_err(pg("list identities"))?;
    rows.iter().map(row).collect()
}

pub(super) async fn get(pool: &Pool, name: &str) -> Result<Option<IdentityRecord>, StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    get_in(c, name, false).await
}

pub(super) async fn insert_enrollment(pool: &Pool, e: NewEnrollment) -> Result<(), StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    c.execute(
        "INSERT INTO enrollments (id, token_hash, pool, labels, agent_name, uses_left, expires_ms, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &e.id,
            &e.token_hash,
            &e.pool,
            &super::labels_json(&e.labels),
            &e.agent_name,
            &i64::from(e.uses),
            &e.expires_ms,
            &now_ms(),
        ],
    )
    .await
    .map_err(pg("insert enrollment"))?;
    Ok(())
}

/// One enrolment in one transaction holding the name's lock and the
/// token's row.
pub(super) async fn enroll<T, F>(
    pool: &Pool,
    token_hash: String,
    name: String,
    sign: F,
) -> Result<Result<(Consumed, T), EnrollError>, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Consumed) -> Result<(T, i64), EnrollError> + Send + 'static,
{
    let mut o = client(pool).await?;
    let c: &mut tokio_postgres::Client = &mut o;
    let tx = c.transaction().await.map_err(pg("begin enroll"))?;
    lock_name(&tx, &name).await?;
    let row = tx
        .query_opt(
            "SELECT id, pool, labels, agent_name, uses_left, expires_ms FROM enrollments
             WHERE token_hash = $1 FOR UPDATE",
            &[&token_hash],
        )
        .await
        .map_err(pg("find enrollment"))?;
    let row = row
        .map(|r| -> Result<TokenRow, tokio_postgres::Error> {
            Ok(TokenRow {
                id: r.try_get(0)?,
                pool: r.try_get(1)?,
                labels: r.try_get(2)?,
                pinned: r.try_get(3)?,
                uses_left: r.try_get(4)?,
                expires_ms: r.try_get(5)?,
            })
        })
        .transpose()
        .map_err(pg("read enrollment row"))?;
    let existing = get_in(&tx, &name, true).await?;
    // A refusal drops `tx`: rolled back, nothing consumed.
    let admitted = match super::admit(row, existing, name.clone(), now_ms(), sign) {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let id = &admitted.consumed.enrollment_id;
    tx.execute(
        "UPDATE enrollments SET uses_left = uses_left - 1 WHERE id = $1",
        &[id],
    )
    .await
    .map_err(pg("consume enrollment"))?;
    tx.execute(
        "INSERT INTO agent_identities (name, pool, labels, enrollment_id, enrolled_ms, cert_not_after_ms)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (name) DO UPDATE SET pool = $2, labels = $3, enrollment_id = $4,
             enrolled_ms = $5, cert_not_after_ms = $6",
        &[
            &name,
            &admitted.consumed.pool,
            &admitted.labels,
            id,
            &now_ms(),
            &admitted.not_after_ms,
        ],
    )
    .await
    .map_err(pg("record identity"))?;
    tx.commit().await.map_err(pg("commit enroll"))?;
    Ok(Ok((admitted.consumed, admitted.out)))
}

pub(super) async fn renewed(pool: &Pool, name: &str, not_after_ms: i64) -> Result<(), StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    c.execute(
        "UPDATE agent_identities SET cert_not_after_ms = $2 WHERE name = $1",
        &[&name, &not_after_ms],
    )
    .await
    .map_err(pg("record renewal"))?;
    Ok(())
}

pub(super) async fn revoke(
    pool: &Pool,
    name: String,
    when_ms: i64,
) -> Result<IdentityRecord, StoreError> {
    let mut o = client(pool).await?;
    let c: &mut tokio_postgres::Client = &mut o;
    let tx = c.transaction().await.map_err(pg("begin revoke"))?;
    lock_name(&tx, &name).await?;
    let sql = format!(
        "INSERT INTO agent_identities (name, pool, labels, enrollment_id, enrolled_ms, revoked_ms)
         VALUES ($1, '', '{{}}', '', 0, $2)
         ON CONFLICT (name) DO UPDATE SET revoked_ms =
             CASE WHEN agent_identities.revoked_ms = 0 THEN $2 ELSE agent_identities.revoked_ms END
         RETURNING {COLS}"
    );
    let r = tx
        .query_one(sql.as_str(), &[&name, &when_ms])
        .await
        .map_err(pg("revoke agent"))?;
    let record = row(&r)?;
    tx.commit().await.map_err(pg("commit revoke"))?;
    Ok(record)
}

pub(super) async fn known_agent(pool: &Pool, name: &str) -> Result<bool, StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    let r = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE id = $1)
                 OR EXISTS (SELECT 1 FROM agent_identities WHERE name = $1)",
            &[&name],
        )
        .await
        .map_err(pg("find agent"))?;
    r.try_get(0).map_err(pg("read agent count"))
}

/// The identity of `name`; with `lock`, its row stays locked until the
/// transaction ends.
async fn get_in<C: GenericClient + Sync>(
    c: &C,
    name: &str,
    lock: bool,
) -> Result<Option<IdentityRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLS} FROM agent_identities WHERE name = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let r = c
        .query_opt(sql.as_str(), &[&name])
        .await
        .map_err(pg("get identity"))?;
    r.as_ref().map(row).transpose()
}

fn row(r: &tokio_postgres::Row) -> Result<IdentityRecord, StoreError> {
    let read = || -> Result<IdentityRecord, tokio_postgres::Error> {
        let labels: String = r.try_get(2)?;
        Ok(IdentityRecord {
            name: r.try_get(0)?,
            pool: r.try_get(1)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            enrollment_id: r.try_get(3)?,
            cert_not_after_ms: r.try_get(4)?,
            revoked_ms: r.try_get(5)?,
        })
    };
    read().map_err(pg("read identity row"))
}
