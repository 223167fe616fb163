//! [`ShardSpec`]: the I-th of N deterministic, contiguous parts of a row list.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use super::ShardError;

/// The `index`-th (0-based) of `count` parts of a list of rows: rows
/// `[index·n/count, (index+1)·n/count)` of a list of n, so the parts are contiguous, in order,
/// cover every row exactly once and differ in size by at most one. Written `I/N` (`2/7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl ShardSpec {
    /// The whole list as one part (`0/1`).
    pub const WHOLE: ShardSpec = ShardSpec { index: 0, count: 1 };

    /// A part, checked: `count ≥ 1` and `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Self, ShardError> {
        if count == 0 || index >= count {
            return Err(ShardError::BadSpec(format!(
                "{index}/{count}: the shard index must be in 0..N and N at least 1"
            )));
        }
        Ok(Self { index, count })
    }

    /// The rows of this part in a list of `n` rows.
    pub fn range(&self, n: usize) -> Range<usize> {
        // u128: index·n cannot overflow.
        let at = |i: usize| ((i as u128 * n as u128) / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }

    /// Whether this is the whole list (`0/1`).
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }
}

impl FromStr for ShardSpec {
    type Err = ShardError;

    /// Parses `I/N` (0 ≤ I < N).
    fn from_str(s: &str) -> Result<Self, ShardError> {
        let bad = || {
            ShardError::BadSpec(format!(
                "{s:?}: expected I/N with 0 <= I < N, e.g. 0/4 for the first of 4 shards"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse::<usize>().map_err(|_| bad())?;
        let n = n.trim().parse::<usize>().map_err(|_| bad())?;
        Self::new(i, n).map_err(|_| bad())
    }
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_row_once_in_order() {
        for n in [0usize, 1, 2, 5, 7, 100, 1001] {
            for count in [1usize, 2, 3, 7, 13] {
                let mut next = 0;
                for index in 0..count {
                    let r = ShardSpec::new(index, count).unwrap().range(n);
                    assert_eq!(r.start, next, "n={n} {index}/{count}");
                    assert!(r.len() <= n / count + 1 && r.len() >= n / count);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
        assert_eq!(ShardSpec::new(1, 3).unwrap().range(10), 3..6);
    }

    #[test]
    fn parses_and_prints() {
        let s: ShardSpec = "2/7".parse().unwrap();
        assert_eq!(s, ShardSpec { index: 2, count: 7 });
        assert_eq!(s.to_string(), "2/7");
        for bad in ["7/7", "1/0", "a/3", "3", "-1/3", "1/3/4", ""] {
            let err = bad.parse::<ShardSpec>().unwrap_err().to_string();
            assert!(err.contains("expected I/N"), "{bad}: {err}");
        }
    }
}
