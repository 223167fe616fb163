//! Reading ahead of the database: files are read (hashed, decoded) for the next batch on a
//! worker thread, in parallel, while this thread commits the current one.

use rayon::prelude::*;

/// Runs `prepare` over each chunk of `items` (its items in parallel on rayon's pool) on a
/// reader thread, one chunk ahead of `consume`, which runs on the calling thread in chunk
/// order. `consume` returns `Ok(false)` to stop early; the reader then stops too.
pub(crate) fn one_chunk_ahead<T, P, E>(
    items: &[T],
    chunk_size: usize,
    prepare: impl Fn(&T) -> P + Sync,
    mut consume: impl FnMut(&[T], Vec<P>) -> Result<bool, E>,
) -> Result<(), E>
where
    T: Sync,
    P: Send,
{
    let chunk_size = chunk_size.max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(&[T], Vec<P>)>(1);
    let prepare = &prepare;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for chunk in items.chunks(chunk_size) {
                let prepared: Vec<P> = chunk.par_iter().map(prepare).collect();
                if tx.send((chunk, prepared)).is_err() {
                    break;
                }
            }
        });
        for (chunk, prepared) in rx {
            if !consume(chunk, prepared)? {
                break;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_arrive_in_order_with_their_results() {
        let items: Vec<u32> = (0..103).collect();
        let mut seen = Vec::new();
        one_chunk_ahead(
            &items,
            10,
            |x| x * 2,
            |chunk, doubled| {
                assert_eq!(chunk.len(), doubled.len());
                seen.extend(chunk.iter().zip(doubled).map(|(a, b)| (*a, b)));
                Ok::<_, ()>(true)
            },
        )
        .unwrap();
        assert_eq!(seen, items.iter().map(|&x| (x, x * 2)).collect::<Vec<_>>());
    }

    #[test]
    fn stopping_and_errors_end_the_reader() {
        let items: Vec<u32> = (0..1000).collect();
        let mut calls = 0;
        one_chunk_ahead(
            &items,
            10,
            |x| *x,
            |_, _| {
                calls += 1;
                Ok::<_, ()>(calls < 3)
            },
        )
        .unwrap();
        assert_eq!(calls, 3);
        let err = one_chunk_ahead(
            &items,
            10,
            |x| *x,
            |chunk, _| {
                if chunk[0] == 20 {
                    Err(format!("at {}", chunk[0]))
                } else {
                    Ok(true)
                }
            },
        );
        assert_eq!(err, Err("at 20".to_string()));
    }
}
