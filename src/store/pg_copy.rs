//! Samples into PostgreSQL with `COPY … FROM STDIN`, and the bulk load's two lanes.
//!
//! A batch's ids are drawn from the table's sequence first, in row order, and its rows are
//! streamed in `COPY`'s text format while they are encoded (the server parses one piece while
//! the next is written). During a bulk load into an empty table a second connection copies
//! the second half of every batch at the same time as the first connection copies the first
//! half, so the server works on two cores; the halves are committed in id order, so a reader
//! never sees a later id before an earlier one.

use std::collections::HashMap;
use std::io::Write;

use postgres::{Client, GenericClient};

use super::NewSample;

type PgResult<T> = std::result::Result<T, postgres::Error>;

/// Bytes of encoded rows sent to the server at a time.
const SEND_BYTES: usize = 64 * 1024;

/// Rows below which a batch is not split over two connections (the second connection's
/// round trips would cost more than its half saves).
pub(super) const SPLIT_MIN_ROWS: usize = 2_000;

/// What a transaction runs before it draws sample ids: the table's writer lock and a
/// transaction id, so that [`Store::max_sample_id`](super::Store::max_sample_id) sees it as an
/// open writer from the moment it holds ids until it ends.
pub(super) const CLAIM_IDS: &str =
    "LOCK TABLE samples IN ROW EXCLUSIVE MODE; SELECT txid_current()";

/// Draws `n` ids from the samples table's sequence, ascending.
fn next_ids(client: &mut impl GenericClient, n: usize) -> PgResult<Vec<i64>> {
    let mut ids: Vec<i64> = client
        .query_one(
            // The sequence looked up once (materialised), not per row: a lookup per row
            // costs 4 ms per 1 000 rows, 5 times the ids themselves. One array, not a row
            // per id.
            "WITH s AS MATERIALIZED \
             (SELECT pg_get_serial_sequence('samples', 'id')::regclass AS seq) \
             SELECT COALESCE(array_agg(nextval(s.seq)), '{}') \
             FROM s, generate_series(1, $1::bigint)",
            &[&(n as i64)],
        )?
        .get(0);
    // Arrival order is id order: the batch's rows take its ids in ascending order.
    ids.sort_unstable();
    Ok(ids)
}

/// Copies `rows` in with the given `ids` (same length); `Ok(false)` when the rows could not
/// be sent for a reason other than the server's (the copy is then aborted).
fn copy_rows(client: &mut impl GenericClient, rows: &[&NewSample], ids: &[i64]) -> PgResult<bool> {
    let mut writer = client.copy_in(
        "COPY samples (id, ikey, timestamp, image_path, sha256, label_given, label_true, \
         source, split, status, reject_reason) FROM STDIN",
    )?;
    let mut text = String::with_capacity(SEND_BYTES + 4096);
    let mut rows = ids.iter().zip(rows).peekable();
    while let Some((id, s)) = rows.next() {
        copy_text_row(&mut text, *id, s);
        if text.len() < SEND_BYTES && rows.peek().is_some() {
            continue;
        }
        // The writer wraps the server's errors in I/O errors; dropping it unfinished aborts
        // the copy.
        if let Err(e) = writer.write_all(text.as_bytes()) {
            return match e
                .into_inner()
                .map(|inner| inner.downcast::<postgres::Error>())
            {
                Some(Ok(server)) => Err(*server),
                _ => Ok(false),
            };
        }
        text.clear();
    }
    writer.finish()?;
    Ok(true)
}

/// Copies `rows` with fresh ids in one transaction of `client`; the rows' ids by key, or
/// `None` when the rows could not be sent for a reason other than the server's.
pub(super) fn copy_sample_rows(
    client: &mut impl GenericClient,
    rows: &[&NewSample],
) -> PgResult<Option<HashMap<String, i64>>> {
    let ids = next_ids(client, rows.len())?;
    Ok(copy_rows(client, rows, &ids)?.then(|| by_key(rows, &ids)))
}

fn by_key(rows: &[&NewSample], ids: &[i64]) -> HashMap<String, i64> {
    rows.iter()
        .map(|s| s.key.clone())
        .zip(ids.iter().copied())
        .collect()
}

/// What [`copy_on_two`] did.
pub(super) enum TwoLanes {
    /// Every row is stored; their ids by key.
    Stored(HashMap<String, i64>),
    /// Only the first `n` rows are stored (the second lane's commit failed); their ids.
    FirstStored(usize, HashMap<String, i64>),
    /// Nothing is stored (a conflicting key, a lost connection, …): the batch is to go the
    /// checked way. The error, when the server gave one.
    NotStored(Option<postgres::Error>),
}

/// Copies the first half of `rows` on `first` and the second half on `second` at the same
/// time, each in its own transaction, then commits the first half before the second. Both
/// transactions claim their writer lock ([`CLAIM_IDS`]) before the ids are drawn (in the
/// first).
pub(super) fn copy_on_two(
    first: &mut Client,
    second: &mut Client,
    rows: &[&NewSample],
) -> TwoLanes {
    let (mut early, late) = match (claim(first), claim(second)) {
        (Ok(early), Ok(late)) => (early, late),
        (Err(e), _) | (_, Err(e)) => return TwoLanes::NotStored(Some(e)),
    };
    let ids = match next_ids(&mut early, rows.len()) {
        Ok(ids) => ids,
        Err(e) => return TwoLanes::NotStored(Some(e)),
    };
    let mid = rows.len() / 2;
    let (head, tail) = rows.split_at(mid);
    let (head_ids, tail_ids) = ids.split_at(mid);
    std::thread::scope(|scope| {
        let late = scope.spawn(move || copy_in(late, tail, tail_ids));
        let early = copy_in(early, head, head_ids);
        let late = late
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // Either lane's failure rolls both back (dropping a transaction rolls it back).
        let (early, late) = match (early, late) {
            (Ok(Some(early)), Ok(Some(late))) => (early, late),
            (Err(e), _) | (_, Err(e)) => return TwoLanes::NotStored(Some(e)),
            _ => return TwoLanes::NotStored(None),
        };
        if let Err(e) = early.commit() {
            return TwoLanes::NotStored(Some(e));
        }
        match late.commit() {
            Ok(()) => TwoLanes::Stored(by_key(rows, &ids)),
            Err(_) => TwoLanes::FirstStored(mid, by_key(head, head_ids)),
        }
    })
}

/// A transaction of `client` that has claimed its writer lock ([`CLAIM_IDS`]).
fn claim(client: &mut Client) -> PgResult<postgres::Transaction<'_>> {
    let mut tx = client.transaction()?;
    tx.batch_execute(CLAIM_IDS)?;
    Ok(tx)
}

/// Copies `rows` in `tx`, left open; `None` as in [`copy_rows`].
fn copy_in<'a>(
    mut tx: postgres::Transaction<'a>,
    rows: &[&NewSample],
    ids: &[i64],
) -> PgResult<Option<postgres::Transaction<'a>>> {
    Ok(copy_rows(&mut tx, rows, ids)?.then_some(tx))
}

/// Appends one row of `COPY`'s text format: tab-separated, `\N` for null, the text escaped.
fn copy_text_row(out: &mut String, id: i64, s: &NewSample) {
    use std::fmt::Write;
    let _ = write!(out, "{id}\t");
    for (i, field) in [
        Some(s.key.as_str()),
        Some(s.timestamp.as_str()),
        Some(s.image_path.as_str()),
        s.sha256.as_deref(),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            out.push('\t');
        }
        copy_text_field(out, field);
    }
    let _ = write!(out, "\t{}\t", s.label_given);
    match s.label_true {
        Some(label) => {
            let _ = write!(out, "{label}");
        }
        None => out.push_str("\\N"),
    }
    for field in [
        Some(s.source.as_str()),
        Some(s.split.as_str()),
        Some(s.status.as_str()),
        s.status.reason(),
    ] {
        out.push('\t');
        copy_text_field(out, field);
    }
    out.push('\n');
}

/// One text field of `COPY`'s text format: backslash, tab, newline and carriage return
/// escaped; `None` as `\N`.
fn copy_text_field(out: &mut String, field: Option<&str>) {
    let Some(text) = field else {
        out.push_str("\\N");
        return;
    };
    // Runs of plain characters are copied whole.
    let mut rest = text;
    while let Some(at) = rest.find(['\\', '\t', '\n', '\r']) {
        out.push_str(&rest[..at]);
        out.push_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            _ => "\\r",
        });
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SampleStatus, Split};

    #[test]
    fn copy_rows_escape_text_and_write_nulls() {
        let sample = NewSample {
            key: "k\\1".into(),
            timestamp: "2026-12-04T16:00:00Z".into(),
            image_path: "/a\tb\nc\rd.png".into(),
            sha256: None,
            label_given: 3,
            label_true: None,
            source: "monday".into(),
            split: Split::Gate,
            status: SampleStatus::Rejected("bad\\png".into()),
        };
        let mut text = String::new();
        copy_text_row(&mut text, 7, &sample);
        assert_eq!(
            text,
            "7\tk\\\\1\t2026-12-04T16:00:00Z\t/a\\tb\\nc\\rd.png\t\\N\t3\t\\N\tmonday\tgate\t\
             rejected\tbad\\\\png\n"
        );
        let accepted = NewSample {
            sha256: Some("ab".into()),
            label_true: Some(4),
            split: Split::Train,
            status: SampleStatus::Accepted,
            ..sample
        };
        text.clear();
        copy_text_row(&mut text, 8, &accepted);
        assert!(
            text.ends_with("\tab\t3\t4\tmonday\ttrain\taccepted\t\\N\n"),
            "{text}"
        );
    }
}
