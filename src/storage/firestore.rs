//! [`Ledger`] on Firestore (crate `firestore`, gRPC; the emulator when
//! `FIRESTORE_EMULATOR_HOST` is set).
//!
//! Provider documents stay compatible with the legacy ones (`aiCallsUsed`, `aiCallsLimit`);
//! quotad adds `quotadEpoch`, `quotadWatermark`, `quotadVersion`, `quotadKeys` (idempotency
//! records) and `quotadFallback` (the last decision a replica made here for lack of Redis,
//! see [`FallbackMark`]). Its own documents live
//! outside the provider collection: `quotad/phase`, `quotad/redis-sentinel` and
//! `quotad_changed/*` (providers decided by Firestore while Redis was away); in
//! `quotad_internal` and `quotad_internal_changed` when the provider collection is named
//! `quotad` or `quotad_changed`.

use std::{collections::BTreeMap, sync::RwLock, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use firestore::{FirestoreDb, FirestoreDbOptions, FirestoreWritePrecondition, errors::FirestoreError};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    Change, DeltaPlan, Document, Fallback, FallbackMark, IdempotencyEntry, KeyRecord, Ledger, LedgerDecision, Record,
    RecordWrite, StorageError, WriteOutcome, carry_fallback_keys, delta_for, fallback_key_entry, idempotency_id,
    merge_keys, settle_twice_decided,
};
use crate::domain::{Phase, ProviderId};

/// The collection of quotad's own documents, and the one of its change markers (another
/// pair when the provider collection has one of these names: every document in that one
/// is a provider's).
fn own_collections(providers: &str) -> (String, String) {
    let base = if ["quotad", "quotad_changed"].contains(&providers) {
        "quotad_internal"
    } else {
        "quotad"
    };
    (base.to_owned(), format!("{base}_changed"))
}
/// A single read or write.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A read-modify-write, retries on contention included.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(50);

/// An integer field that a legacy writer may have stored as a double, or even as text;
/// anything else reads as 0 rather than failing every request for that provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Num {
    Int(i64),
    Float(f64),
    Text(String),
    Other(serde::de::IgnoredAny),
}

fn num(n: &Num) -> i64 {
    n.get()
}

impl Num {
    #[allow(clippy::cast_possible_truncation)]
    fn get(&self) -> i64 {
        match self {
            Num::Int(n) => *n,
            Num::Float(f) => f.round() as i64,
            Num::Text(t) => t
                .trim()
                .parse::<i64>()
                .ok()
                .or_else(|| t.trim().parse::<f64>().ok().map(|f| f.round() as i64))
                .unwrap_or(0),
            Num::Other(_) => 0,
        }
    }
}

#[allow(non_snake_case)]
#[derive(Debug, Clone, Default, Deserialize)]
struct ProviderDoc {
    #[serde(default)]
    aiCallsUsed: Option<Num>,
    #[serde(default)]
    aiCallsLimit: Option<Num>,
    #[serde(default)]
    quotadEpoch: Option<String>,
    #[serde(default)]
    quotadWatermark: Option<Num>,
    #[serde(default)]
    quotadVersion: Option<Num>,
    #[serde(default)]
    quotadKeys: Option<BTreeMap<String, String>>,
    #[serde(default)]
    quotadFallback: Option<String>,
}

impl ProviderDoc {
    fn document(&self) -> Document {
        Document {
            used: self.aiCallsUsed.as_ref().map(num),
            limit: self.aiCallsLimit.as_ref().map(num),
            epoch: self.quotadEpoch.clone(),
            watermark: self.quotadWatermark.as_ref().map(num),
            keys: live_keys(self.quotadKeys.as_ref()),
            fallback: self.fallback(),
        }
    }

    fn fallback(&self) -> Option<FallbackMark> {
        self.quotadFallback.as_deref().and_then(FallbackMark::parse)
    }
}

/// The unexpired idempotency records of a document.
fn live_keys(keys: Option<&BTreeMap<String, String>>) -> Vec<KeyRecord> {
    let now = Utc::now().timestamp_millis();
    keys.into_iter()
        .flatten()
        .filter(|(_, entry)| IdempotencyEntry::parse(entry).is_some_and(|e| e.expires_ms > now))
        .map(|(id, entry)| (id.clone(), entry.clone()))
        .collect()
}

/// The fields one write sets: exactly those that are `Some` (they form the update mask, so
/// other writers' fields, `aiCallsLimit` included, are never touched unless set here).
#[allow(non_snake_case)]
#[derive(Debug, Default, Serialize, Deserialize)]
struct ProviderWrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    aiCallsUsed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aiCallsLimit: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quotadEpoch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quotadWatermark: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quotadVersion: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quotadKeys: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quotadFallback: Option<String>,
}

impl ProviderWrite {
    fn mask(&self) -> Vec<&'static str> {
        let fields = [
            ("aiCallsUsed", self.aiCallsUsed.is_some()),
            ("aiCallsLimit", self.aiCallsLimit.is_some()),
            ("quotadEpoch", self.quotadEpoch.is_some()),
            ("quotadWatermark", self.quotadWatermark.is_some()),
            ("quotadVersion", self.quotadVersion.is_some()),
            ("quotadKeys", self.quotadKeys.is_some()),
            ("quotadFallback", self.quotadFallback.is_some()),
        ];
        fields
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| name)
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetaDoc {
    value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PhaseDoc {
    phase: String,
    since: DateTime<Utc>,
}

/// A provider document of a listing or query, with its id; `None` for a document whose
/// id is not a provider id or whose fields do not parse (skipped).
fn provider_doc(raw: &firestore::FirestoreDocument) -> Option<(ProviderId, ProviderDoc)> {
    let id = raw.name.rsplit('/').next().unwrap_or_default();
    let provider = ProviderId::parse(id).ok()?;
    Some((provider, FirestoreDb::deserialize_doc_to::<ProviderDoc>(raw).ok()?))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChangedDoc {
    provider: String,
    at: DateTime<Utc>,
}

/// Firestore-backed ledger. Connects lazily, so the service starts while Firestore is away.
pub struct FirestoreLedger {
    project: String,
    collection: String,
    /// quotad's own documents (`phase`, `redis-sentinel`), outside `collection`.
    meta: String,
    /// Change markers, outside `collection`.
    changed: String,
    db: RwLock<Option<FirestoreDb>>,
    connect_lock: tokio::sync::Mutex<()>,
    /// Update times of the change markers last listed (see `clear_changed_outside`).
    listed_changes: std::sync::Mutex<std::collections::HashMap<ProviderId, firestore::FirestoreInstant>>,
}

fn classify(err: &FirestoreError) -> StorageError {
    let message = err.to_string();
    let unavailable = match err {
        FirestoreError::NetworkError(_) | FirestoreError::SystemError(_) => true,
        FirestoreError::DatabaseError(e) => {
            e.retry_possible
                || ["Unavailable", "DeadlineExceeded", "transport", "connect"]
                    .iter()
                    .any(|needle| e.details.contains(needle) || message.contains(needle))
        }
        FirestoreError::ErrorInTransaction(_) => true,
        _ => false,
    };
    if unavailable {
        StorageError::Unavailable {
            backend: "firestore",
            message,
        }
    } else {
        StorageError::Other {
            backend: "firestore",
            message,
        }
    }
}

fn timed_out() -> StorageError {
    StorageError::Unavailable {
        backend: "firestore",
        message: "call timed out".into(),
    }
}

/// A document as read, with the precondition that a write based on it must carry: the
/// document unchanged since (its update time), or still absent.
fn versioned(
    raw: Option<&firestore::gcloud_sdk::google::firestore::v1::Document>,
) -> Result<(ProviderDoc, FirestoreWritePrecondition), FirestoreError> {
    let Some(raw) = raw else {
        return Ok((ProviderDoc::default(), FirestoreWritePrecondition::Exists(false)));
    };
    let doc: ProviderDoc = FirestoreDb::deserialize_doc_to(raw)?;
    let Some(updated) = raw.update_time else {
        return Err(FirestoreError::DeserializeError(
            firestore::errors::FirestoreSerializationError::from_message("a document without an update time"),
        ));
    };
    Ok((
        doc,
        FirestoreWritePrecondition::UpdateTime(firestore::timestamp_utils::from_timestamp(updated)?),
    ))
}

/// What writing `record` (and the idempotency records `keys`) to `doc` takes: the
/// outcome, and the fields to write unless the document already holds it all.
fn plan_record_write(
    doc: &ProviderDoc,
    record: &Record,
    keys: &[KeyRecord],
    now: i64,
) -> (WriteOutcome, Option<ProviderWrite>) {
    let limit = doc.aiCallsLimit.as_ref().map(num);
    let plan = delta_for(
        record,
        doc.quotadEpoch.as_deref(),
        doc.quotadWatermark.as_ref().map_or(0, num),
        doc.quotadVersion
            .as_ref()
            .map_or(0, |v| u64::try_from(v.get()).unwrap_or(0)),
    );
    let mut write = ProviderWrite::default();
    if plan == DeltaPlan::Stale {
        return (WriteOutcome::Stale, None);
    }
    let mut known = doc.quotadKeys.clone().unwrap_or_default();
    let (correction, settled) = settle_twice_decided(&mut known, keys, doc.quotadEpoch.as_deref(), now);
    let used = doc.aiCallsUsed.as_ref().map_or(0, num);
    let mut carried = false;
    if let DeltaPlan::Add(delta) = plan {
        carried = carry_fallback_keys(&mut known, doc.quotadEpoch.as_deref(), &record.epoch);
        write.aiCallsUsed = Some(super::usage_after_write(used, delta, correction));
        write.quotadEpoch = Some(record.epoch.clone());
        write.quotadWatermark = Some(record.used);
        write.quotadVersion = Some(i64::try_from(record.version).unwrap_or(i64::MAX));
    } else if correction != 0 {
        write.aiCallsUsed = Some(super::usage_after_write(used, 0, correction));
    }
    if settled || carried || keys.iter().any(|(id, _)| !known.contains_key(id)) {
        merge_keys(&mut known, keys, now);
        write.quotadKeys = Some(known);
    }
    let changes = !write.mask().is_empty();
    let fallback = doc.fallback();
    (WriteOutcome::Written { limit, fallback }, changes.then_some(write))
}

/// Whether a write failed only because another writer changed the document first.
fn lost_race(err: &FirestoreError) -> bool {
    match err {
        FirestoreError::DataConflictError(_) | FirestoreError::DataNotFoundError(_) => true,
        FirestoreError::DatabaseError(e) => {
            ["FailedPrecondition", "Aborted", "AlreadyExists", "NotFound"].contains(&e.public.code.as_str())
        }
        _ => false,
    }
}

impl FirestoreLedger {
    /// One optimistic read-modify-write of a provider document: reads it with its update
    /// time, lets `plan` choose the answer and the fields to write, and writes them only if
    /// the document is unchanged since the read (or still absent); a lost race reads again.
    /// No server-side transaction is held, so a replica killed mid-write leaves no lock.
    async fn modify<T>(
        &self,
        provider: &ProviderId,
        plan: impl Fn(&ProviderDoc) -> (T, Option<ProviderWrite>) + Send + Sync,
    ) -> Result<T, StorageError> {
        let db = self.db().await?;
        let work = async {
            let mut backoff = Duration::from_millis(5);
            loop {
                let raw = db
                    .fluent()
                    .select()
                    .by_id_in(&self.collection)
                    .one(provider.as_str())
                    .await?;
                let (doc, precondition) = versioned(raw.as_ref())?;
                let (answer, write) = plan(&doc);
                let Some(write) = write else {
                    return Ok(answer);
                };
                let written = db
                    .fluent()
                    .update()
                    .fields(write.mask())
                    .in_col(&self.collection)
                    .precondition(precondition)
                    .document_id(provider.as_str())
                    .object(&write)
                    .execute::<ProviderDoc>()
                    .await;
                match written {
                    Ok(_) => return Ok(answer),
                    Err(err) if lost_race(&err) => {
                        metrics::counter!("quotad_store_write_conflicts_total").increment(1);
                        let jitter = Duration::from_millis(rand::random::<u64>() % 10);
                        tokio::time::sleep(backoff + jitter).await;
                        backoff = (backoff * 2).min(Duration::from_millis(200));
                    }
                    Err(err) => return Err(err),
                }
            }
        };
        self.timed(TRANSACTION_TIMEOUT, work).await
    }

    pub fn new(project: &str, collection: &str) -> Self {
        let (meta, changed) = own_collections(collection);
        Self {
            project: project.to_owned(),
            collection: collection.to_owned(),
            meta,
            changed,
            db: RwLock::new(None),
            connect_lock: tokio::sync::Mutex::new(()),
            listed_changes: std::sync::Mutex::default(),
        }
    }

    async fn db(&self) -> Result<FirestoreDb, StorageError> {
        if let Some(db) = self.db.read().unwrap().clone() {
            return Ok(db);
        }
        let _guard = self.connect_lock.lock().await;
        if let Some(db) = self.db.read().unwrap().clone() {
            return Ok(db);
        }
        let options = FirestoreDbOptions::new(self.project.clone());
        let db = tokio::time::timeout(CALL_TIMEOUT, FirestoreDb::with_options(options))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| classify(&e))?;
        *self.db.write().unwrap() = Some(db.clone());
        Ok(db)
    }

    async fn timed<T>(
        &self,
        limit: Duration,
        call: impl std::future::Future<Output = Result<T, FirestoreError>>,
    ) -> Result<T, StorageError> {
        tokio::time::timeout(limit, call)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| classify(&e))
    }
}

#[async_trait]
impl Ledger for FirestoreLedger {
    fn kind(&self) -> &'static str {
        "firestore"
    }

    async fn ping(&self) -> Result<(), StorageError> {
        let db = self.db().await?;
        self.timed(Duration::from_secs(3), async move {
            db.fluent()
                .select()
                .by_id_in(&self.meta)
                .obj::<PhaseDoc>()
                .one("phase")
                .await
                .map(|_| ())
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(provider = %provider), err(level = "debug"))]
    async fn read(&self, provider: &ProviderId) -> Result<Option<Document>, StorageError> {
        let db = self.db().await?;
        let doc: Option<ProviderDoc> = self
            .timed(
                CALL_TIMEOUT,
                db.fluent()
                    .select()
                    .by_id_in(&self.collection)
                    .obj()
                    .one(provider.as_str()),
            )
            .await?;
        Ok(doc.map(|d| d.document()))
    }

    #[tracing::instrument(skip_all, fields(provider = %provider, version = record.version), err(level = "debug"))]
    async fn write_record(
        &self,
        provider: &ProviderId,
        record: &Record,
        keys: &[KeyRecord],
    ) -> Result<WriteOutcome, StorageError> {
        let now = Utc::now().timestamp_millis();
        self.modify(provider, |doc| plan_record_write(doc, record, keys, now))
            .await
    }

    /// Up to 500 records in one batch read and one batch write, each write on the
    /// precondition that its document is unchanged since the read; a write that lost a
    /// race is redone on its own.
    async fn write_records(
        &self,
        items: &[RecordWrite],
    ) -> Result<Vec<Result<WriteOutcome, StorageError>>, StorageError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let db = self.db().await?;
        let ids: Vec<String> = items.iter().map(|(p, _, _)| p.as_str().to_owned()).collect();
        let fetched: std::collections::HashMap<String, Option<_>> = self
            .timed(CALL_TIMEOUT, async {
                let stream = db.fluent().select().by_id_in(&self.collection).batch(ids).await?;
                Ok(stream.collect::<Vec<_>>().await)
            })
            .await?
            .into_iter()
            .collect();
        let now = Utc::now().timestamp_millis();
        let mut results: Vec<Option<Result<WriteOutcome, StorageError>>> = (0..items.len()).map(|_| None).collect();
        let mut planned = Vec::new();
        for (i, (provider, record, keys)) in items.iter().enumerate() {
            let raw = fetched.get(provider.as_str()).and_then(Option::as_ref);
            let (doc, precondition) = versioned(raw).map_err(|e| classify(&e))?;
            match plan_record_write(&doc, record, keys, now) {
                (outcome, None) => results[i] = Some(Ok(outcome)),
                (outcome, Some(write)) => planned.push((i, outcome, precondition, write)),
            }
        }
        if !planned.is_empty() {
            let writer = self.timed(CALL_TIMEOUT, db.create_simple_batch_writer()).await?;
            let mut batch = writer.new_batch();
            for (i, _, precondition, write) in &planned {
                db.fluent()
                    .update()
                    .fields(write.mask())
                    .in_col(&self.collection)
                    .precondition(precondition.clone())
                    .document_id(items[*i].0.as_str())
                    .object(write)
                    .add_to_batch(&mut batch)
                    .map_err(|e| classify(&e))?;
            }
            let response = self.timed(CALL_TIMEOUT, batch.write()).await?;
            for (k, (i, outcome, _, _)) in planned.iter().enumerate() {
                let landed = response.statuses.get(k).is_none_or(|status| status.code == 0);
                results[*i] = Some(if landed {
                    Ok(outcome.clone())
                } else {
                    let (provider, record, keys) = &items[*i];
                    self.write_record(provider, record, keys).await
                });
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Ok(WriteOutcome::Stale)))
            .collect())
    }

    #[tracing::instrument(skip_all, fields(provider = %provider, op = change.op.as_str()), err(level = "debug"))]
    async fn decide(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        default_limit: i64,
        fallback: Option<Fallback<'_>>,
    ) -> Result<LedgerDecision, StorageError> {
        if fallback.is_some() {
            // Before the decision: a marker without a change only costs a reload.
            self.note_changed_outside(provider).await?;
        }
        let key_field = change.idempotency_key.map(|k| idempotency_id(change.op, k));
        let decided = self
            .modify(provider, |doc| {
                // Per attempt: a fallback's mark carries the time of the attempt that lands
                // (lost races may retry for seconds), not of the first.
                let now = Utc::now().timestamp_millis();
                let mut keys = doc.quotadKeys.clone().unwrap_or_default();
                keys.retain(|_, entry| IdempotencyEntry::parse(entry).is_some_and(|e| e.expires_ms > now));
                if let Some(prior) = key_field
                    .as_ref()
                    .and_then(|f| keys.get(f))
                    .and_then(|e| IdempotencyEntry::parse(e))
                {
                    if prior.amount != change.amount {
                        return (LedgerDecision::KeyReused, None);
                    }
                    return (LedgerDecision::Replayed(prior.decision), None);
                }
                let used = doc.aiCallsUsed.as_ref().map_or(0, num);
                let limit = doc.aiCallsLimit.as_ref().map_or(default_limit, num);
                let (decision, stored) = super::decide_stored(used, limit, change);
                let mut write = ProviderWrite::default();
                if stored != used {
                    write.aiCallsUsed = Some(stored);
                }
                if let Some(field) = key_field.clone() {
                    let entry = IdempotencyEntry::new(change.amount, decision, now);
                    merge_keys(
                        &mut keys,
                        &[(field, fallback_key_entry(&entry, doc.quotadEpoch.as_deref()))],
                        now,
                    );
                    write.quotadKeys = Some(keys);
                }
                let mut changes = write.aiCallsUsed.is_some() || write.quotadKeys.is_some();
                if let Some(mark) = fallback.and_then(|fallback| {
                    fallback.mark_to_write(doc.fallback().as_ref(), now, changes, doc.aiCallsUsed.is_some())
                }) {
                    write.quotadFallback = Some(mark.render());
                    changes = true;
                }
                (LedgerDecision::Decided(decision), changes.then_some(write))
            })
            .await;
        if fallback.is_some()
            && decided.is_ok()
            && let Err(err) = self.note_changed_outside(provider).await
        {
            // And after it: a reconcile (any replica's) that listed and cleared the first
            // marker while the transaction ran must not have the last word. The decision
            // stands either way; this replica holds the provider at its recovery.
            tracing::warn!(%provider, error = %err, "could not mark a fallback decision again");
        }
        decided
    }

    #[tracing::instrument(skip_all, fields(provider = %provider), err(level = "debug"))]
    async fn add_used(&self, provider: &ProviderId, delta: i64, epoch: &str) -> Result<bool, StorageError> {
        self.modify(provider, |doc| {
            let used = doc.aiCallsUsed.as_ref().map(num);
            let Some(used) = super::used_after_adding(used, doc.quotadEpoch.as_deref(), delta, epoch) else {
                return (false, None);
            };
            let write = ProviderWrite {
                aiCallsUsed: Some(used),
                ..ProviderWrite::default()
            };
            (true, Some(write))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(provider = %provider), err(level = "debug"))]
    async fn announce_fallback(&self, provider: &ProviderId, by: &str) -> Result<(), StorageError> {
        self.modify(provider, |doc| {
            let mark = FallbackMark {
                by: by.to_owned(),
                at_ms: Utc::now().timestamp_millis(),
            };
            let write = ProviderWrite {
                aiCallsUsed: doc.aiCallsUsed.is_none().then_some(0),
                quotadFallback: Some(mark.render()),
                ..ProviderWrite::default()
            };
            ((), Some(write))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(provider = %provider), err(level = "debug"))]
    async fn set_quota(
        &self,
        provider: &ProviderId,
        used: Option<i64>,
        limit: Option<i64>,
        new_epoch: &str,
    ) -> Result<Document, StorageError> {
        self.modify(provider, |doc| {
            let mut write = ProviderWrite::default();
            let mut after = doc.document();
            if let Some(used) = used {
                write.aiCallsUsed = Some(used);
                write.quotadEpoch = Some(new_epoch.to_owned());
                write.quotadWatermark = Some(used);
                write.quotadVersion = Some(0);
                after.used = Some(used);
                after.epoch = Some(new_epoch.to_owned());
            }
            if let Some(limit) = limit {
                write.aiCallsLimit = Some(limit);
                after.limit = Some(limit);
            }
            (after, Some(write))
        })
        .await
    }

    async fn list_documents(
        &self,
        page: Option<String>,
        size: usize,
    ) -> Result<(Vec<(ProviderId, Document)>, Option<String>), StorageError> {
        let db = self.db().await?;
        let listing = db.fluent().list().from(&self.collection).page_size(size);
        let listing = match page {
            Some(token) => listing.page_token(token),
            None => listing,
        };
        let result = self.timed(CALL_TIMEOUT, listing.get_page()).await?;
        let docs = result.documents.iter().filter_map(provider_doc);
        let docs = docs.map(|(provider, doc)| (provider, doc.document())).collect();
        Ok((docs, result.page_token.filter(|t| !t.is_empty())))
    }

    /// A range query on `quotadFallback`, whose text starts with the mark's time in ms
    /// (13 digits until the year 2286, so text order is time order); Firestore's automatic
    /// single-field index serves it. A poll that finds nothing costs one document read.
    async fn fallback_marks(&self, since_ms: i64, max: usize) -> Result<Vec<(ProviderId, FallbackMark)>, StorageError> {
        let db = self.db().await?;
        let since = since_ms.to_string();
        let docs = self
            .timed(
                CALL_TIMEOUT,
                db.fluent()
                    .select()
                    .fields(["quotadFallback"])
                    .from(self.collection.as_str())
                    .filter(|q| q.for_all([q.field("quotadFallback").greater_than_or_equal(since.clone())]))
                    // newest first: past `max`, the oldest marks are the ones left out
                    .order(|o| o.fields([o.field("quotadFallback").desc()]))
                    .limit(u32::try_from(max).unwrap_or(u32::MAX))
                    .query(),
            )
            .await?;
        let marks = docs.iter().filter_map(provider_doc).filter_map(|(provider, doc)| {
            let mark = doc.fallback().filter(|mark| mark.at_ms >= since_ms)?;
            Some((provider, mark))
        });
        Ok(marks.collect())
    }

    async fn changed_outside(&self, max: usize) -> Result<Vec<ProviderId>, StorageError> {
        let db = self.db().await?;
        let docs = self
            .timed(
                CALL_TIMEOUT,
                db.fluent()
                    .select()
                    .from(self.changed.as_str())
                    .limit(u32::try_from(max).unwrap_or(u32::MAX))
                    .query(),
            )
            .await?;
        let mut listed = self.listed_changes.lock().unwrap();
        let mut providers = Vec::new();
        for raw in docs {
            let Ok(doc) = FirestoreDb::deserialize_doc_to::<ChangedDoc>(&raw) else {
                continue;
            };
            let Ok(provider) = ProviderId::parse(&doc.provider) else {
                continue;
            };
            if let Some(at) = raw
                .update_time
                .and_then(|t| firestore::timestamp_utils::from_timestamp(t).ok())
            {
                listed.insert(provider.clone(), at);
            }
            providers.push(provider);
        }
        Ok(providers)
    }

    async fn note_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        let db = self.db().await?;
        let doc = ChangedDoc {
            provider: provider.as_str().to_owned(),
            at: Utc::now(),
        };
        self.timed(
            CALL_TIMEOUT,
            db.fluent()
                .update()
                .in_col(&self.changed)
                .document_id(provider.as_str())
                .object(&doc)
                .execute::<ChangedDoc>(),
        )
        .await
        .map(|_| ())
    }

    /// Deletes the marker only if nobody rewrote it since it was listed (a fallback
    /// decision made meanwhile keeps it, for the next reconciliation).
    async fn clear_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        let db = self.db().await?;
        let listed_at = self.listed_changes.lock().unwrap().remove(provider);
        let delete = db.fluent().delete().from(self.changed.as_str());
        let delete = match listed_at {
            Some(at) => delete.precondition(FirestoreWritePrecondition::UpdateTime(at)),
            None => delete,
        };
        match tokio::time::timeout(CALL_TIMEOUT, delete.document_id(provider.as_str()).execute()).await {
            Err(_) => Err(timed_out()),
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) if lost_race(&err) => Ok(()),
            Ok(Err(err)) => Err(classify(&err)),
        }
    }

    async fn meta(&self, name: &str) -> Result<Option<String>, StorageError> {
        let db = self.db().await?;
        let doc: Option<MetaDoc> = self
            .timed(CALL_TIMEOUT, db.fluent().select().by_id_in(&self.meta).obj().one(name))
            .await?;
        Ok(doc.map(|d| d.value))
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StorageError> {
        let db = self.db().await?;
        let doc = MetaDoc {
            value: value.to_owned(),
        };
        self.timed(
            CALL_TIMEOUT,
            db.fluent()
                .update()
                .in_col(&self.meta)
                .document_id(name)
                .object(&doc)
                .execute::<MetaDoc>(),
        )
        .await
        .map(|_| ())
    }

    async fn phase(&self) -> Result<Option<(Phase, DateTime<Utc>)>, StorageError> {
        let db = self.db().await?;
        let doc: Option<PhaseDoc> = self
            .timed(
                CALL_TIMEOUT,
                db.fluent().select().by_id_in(&self.meta).obj().one("phase"),
            )
            .await?;
        Ok(doc.and_then(|d| Phase::parse(&d.phase).map(|p| (p, d.since))))
    }

    async fn set_phase(&self, phase: Phase, since: DateTime<Utc>) -> Result<(), StorageError> {
        let db = self.db().await?;
        let doc = PhaseDoc {
            phase: phase.as_str().to_owned(),
            since,
        };
        self.timed(
            CALL_TIMEOUT,
            db.fluent()
                .update()
                .in_col(&self.meta)
                .document_id("phase")
                .object(&doc)
                .execute::<PhaseDoc>(),
        )
        .await
        .map(|_| ())
    }
}
