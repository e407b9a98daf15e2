//! Collections decoded with a bound on their length, so that no allocation is sized from an
//! unchecked count and a frame's memory stays proportional to the limits, not to what a
//! peer claims. Used as `#[serde(deserialize_with = "crate::bounded::vec::<_, _, N>")]`; the
//! encoding is unchanged (postcard's length-prefixed sequence).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

/// Events in one batch or delivery, at most.
pub const MAX_BATCH_EVENTS: usize = 65_536;
/// Gap records (or refusals) in one frame, at most.
pub const MAX_FRAME_GAPS: usize = 65_536;
/// MQTT 5 user properties on one event, at most.
pub const MAX_USER_PROPERTIES: usize = 1_024;
/// Filters in one subscription, at most.
pub const MAX_FILTERS: usize = 64;
/// Records in one replication round, at most.
pub const MAX_ROUND_RECORDS: usize = 65_536;
/// Nodes on one record's path, at most.
pub const MAX_PATH: usize = 64;
/// Compressions a hello may offer, at most.
pub const MAX_OFFERS: usize = 8;

/// Decodes a sequence of at most `N` elements; more is a decoding error. The first
/// allocation is at most 4 KiB worth of elements whatever length the input announces; the
/// vector grows only with elements actually decoded.
pub fn vec<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const N: usize>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for Bounded<T, N> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a sequence of at most {N} elements")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let announced = seq.size_hint().unwrap_or(0);
            if announced > N {
                return Err(A::Error::custom(format_args!(
                    "{announced} elements where at most {N} are allowed"
                )));
            }
            let first = announced.min(4096 / std::mem::size_of::<T>().max(1));
            let mut out = Vec::with_capacity(first);
            while let Some(x) = seq.next_element()? {
                if out.len() == N {
                    return Err(A::Error::custom(format_args!(
                        "more than {N} elements where at most {N} are allowed"
                    )));
                }
                out.push(x);
            }
            Ok(out)
        }
    }

    d.deserialize_seq(Bounded::<T, N>(PhantomData))
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Three {
        #[serde(deserialize_with = "super::vec::<_, _, 3>")]
        xs: Vec<u32>,
    }

    #[derive(Serialize)]
    struct Any {
        xs: Vec<u32>,
    }

    #[test]
    fn a_sequence_within_the_bound_decodes_and_a_longer_one_is_refused() {
        let ok = postcard::to_allocvec(&Any { xs: vec![1, 2, 3] }).unwrap();
        assert_eq!(
            postcard::from_bytes::<Three>(&ok).unwrap(),
            Three { xs: vec![1, 2, 3] }
        );
        let long = postcard::to_allocvec(&Any {
            xs: vec![1, 2, 3, 4],
        })
        .unwrap();
        assert!(postcard::from_bytes::<Three>(&long).is_err());
        // A length prefix that claims 2^32 elements, with none behind it.
        let lie = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(postcard::from_bytes::<Three>(&lie).is_err());
    }
}
