//! Compact sets of seqs, kept as disjoint, non-adjacent inclusive ranges.
//!
//! A node keeps one per (origin, epoch) and state — held, lost, rejected, not selected — so
//! that dedupe is exact and has no time window, and completeness is a query. Seqs that
//! arrive in order extend the last range in place, so the set stays one range long; seqs that
//! arrive out of order or twice are still handled exactly.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

/// A set of `u64`s stored as ranges. Serialized as a list of `(first, last)` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct RangeSet {
    /// first → last (inclusive); ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when the set holds no seq.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many seqs the set holds (saturating at `u64::MAX`: the set `0..=u64::MAX` holds
    /// one more seq than a u64 counts).
    pub fn len(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(&a, &b)| (b - a).saturating_add(1))
            .fold(0, u64::saturating_add)
    }

    /// How many ranges the set is made of.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// True when `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &last)| seq <= last)
    }

    /// True when every seq of `first..=last` is in the set.
    pub fn contains_range(&self, first: u64, last: u64) -> bool {
        first > last
            || self
                .ranges
                .range(..=first)
                .next_back()
                .is_some_and(|(_, &end)| last <= end)
    }

    /// Adds `seq`; returns true if it was not in the set before.
    pub fn insert(&mut self, seq: u64) -> bool {
        self.insert_range(seq, seq) == 1
    }

    /// Adds `first..=last`; returns how many of its seqs were not in the set before.
    /// An empty range (`first > last`) adds nothing.
    pub fn insert_range(&mut self, first: u64, last: u64) -> u64 {
        if first > last {
            return 0;
        }
        // Fast path: extends the last range (in-order arrival).
        if let Some((&a, b)) = self.ranges.iter_mut().next_back() {
            if first > a && first <= b.saturating_add(1) && last >= *b {
                let added = last - *b;
                *b = last;
                return added;
            }
        }
        let mut new_first = first;
        let mut new_last = last;
        let mut overlap = 0u64;
        // A range starting before `first` that reaches it (or touches it).
        if let Some((&a, &b)) = self.ranges.range(..first).next_back() {
            if b.saturating_add(1) >= first {
                new_first = a;
                new_last = new_last.max(b);
                if b >= first {
                    overlap = overlap.saturating_add((b.min(last) - first).saturating_add(1));
                }
                self.ranges.remove(&a);
            }
        }
        // Ranges starting within `first..=last + 1`.
        let upper = last.saturating_add(1);
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(first..=upper)
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, b) in inside {
            if a <= last {
                overlap = overlap.saturating_add((b.min(last) - a).saturating_add(1));
            }
            new_last = new_last.max(b);
            self.ranges.remove(&a);
        }
        self.ranges.insert(new_first, new_last);
        // (last - first + 1) - overlap, without overflowing for 0..=u64::MAX.
        match overlap.checked_sub(1) {
            Some(o) => (last - first).saturating_sub(o),
            None => (last - first).saturating_add(1),
        }
    }

    /// Removes every seq below `seq`.
    pub fn remove_below(&mut self, seq: u64) {
        let keep = self.ranges.split_off(&seq);
        let straddling = self
            .ranges
            .iter()
            .next_back()
            .and_then(|(_, &last)| (last >= seq).then_some(last));
        self.ranges = keep;
        if let Some(last) = straddling {
            self.ranges.insert(seq, last);
        }
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = RangeInclusive<u64>> + '_ {
        self.ranges.iter().map(|(&a, &b)| a..=b)
    }

    /// The smallest seq in the set.
    pub fn first(&self) -> Option<u64> {
        self.ranges.keys().next().copied()
    }

    /// The largest seq in the set.
    pub fn last(&self) -> Option<u64> {
        self.ranges.values().next_back().copied()
    }

    /// The missing stretches between `lo` and `hi` (inclusive), in order.
    pub fn missing(&self, lo: u64, hi: u64) -> Vec<RangeInclusive<u64>> {
        let mut out = Vec::new();
        if lo > hi {
            return out;
        }
        let mut next = lo;
        let start = self
            .ranges
            .range(..=lo)
            .next_back()
            .map(|(&a, _)| a)
            .unwrap_or(lo);
        for (&a, &b) in self.ranges.range(start..=hi) {
            if b < next {
                continue;
            }
            if a > next {
                out.push(next..=a - 1);
            }
            if b >= hi {
                return out;
            }
            next = b + 1;
        }
        out.push(next..=hi);
        out
    }
}

impl From<Vec<(u64, u64)>> for RangeSet {
    fn from(pairs: Vec<(u64, u64)>) -> Self {
        let mut set = RangeSet::new();
        for (a, b) in pairs {
            set.insert_range(a, b);
        }
        set
    }
}

impl From<RangeSet> for Vec<(u64, u64)> {
    fn from(set: RangeSet) -> Self {
        set.ranges.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_whole_u64_range_neither_overflows_nor_panics() {
        let mut s = RangeSet::new();
        assert_eq!(s.insert_range(0, u64::MAX), u64::MAX);
        assert_eq!(s.len(), u64::MAX);
        assert_eq!(s.insert_range(5, 9), 0);
        assert_eq!(s.insert_range(u64::MAX, u64::MAX), 0);
        let mut t = RangeSet::new();
        t.insert(u64::MAX);
        assert_eq!(t.insert_range(0, u64::MAX), u64::MAX);
        assert_eq!(t.len(), u64::MAX);
    }

    use super::*;

    #[test]
    fn in_order_stays_one_range() {
        let mut s = RangeSet::new();
        for seq in 1..=10_000 {
            assert!(s.insert(seq));
        }
        assert_eq!(s.range_count(), 1);
        assert_eq!(s.len(), 10_000);
        assert!(!s.insert(5_000));
        assert!(s.contains(1) && s.contains(10_000) && !s.contains(0) && !s.contains(10_001));
    }

    #[test]
    fn out_of_order_merges() {
        let mut s = RangeSet::new();
        assert_eq!(s.insert_range(10, 20), 11);
        assert_eq!(s.insert_range(30, 40), 11);
        assert_eq!(s.insert_range(15, 35), 9);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![10..=40]);
        assert_eq!(s.insert_range(41, 41), 1);
        assert_eq!(s.insert_range(8, 9), 2);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![8..=41]);
        assert_eq!(s.insert_range(u64::MAX - 1, u64::MAX), 2);
        assert_eq!(s.insert_range(0, 0), 1);
        assert_eq!(
            s.ranges().collect::<Vec<_>>(),
            vec![0..=0, 8..=41, u64::MAX - 1..=u64::MAX]
        );
        assert!(s.contains_range(8, 41));
        assert!(!s.contains_range(7, 41));
    }

    #[test]
    fn missing_and_remove_below() {
        let s = RangeSet::from(vec![(3, 5), (9, 9), (12, 20)]);
        assert_eq!(s.missing(1, 14), vec![1..=2, 6..=8, 10..=11]);
        assert_eq!(s.missing(4, 5), Vec::<RangeInclusive<u64>>::new());
        assert_eq!(s.missing(21, 22), vec![21..=22]);
        let mut t = s.clone();
        t.remove_below(4);
        assert_eq!(t.ranges().collect::<Vec<_>>(), vec![4..=5, 9..=9, 12..=20]);
        t.remove_below(10);
        assert_eq!(t.ranges().collect::<Vec<_>>(), vec![12..=20]);
    }

    #[test]
    fn serde_round_trip() {
        let s = RangeSet::from(vec![(1, 3), (7, 7)]);
        let bytes = postcard::to_allocvec(&s).unwrap();
        let back: RangeSet = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
    }
}
