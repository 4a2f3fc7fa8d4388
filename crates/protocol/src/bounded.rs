//! Sequences a worker sends, bounded in their number of elements.
//!
//! A frame's byte limit does not bound what it decodes to: an empty string is one
//! byte on the wire and 24 in memory, an empty pair of strings two and 48, so a 5
//! MiB frame of empty header pairs would take over 100 MiB of the supervisor's
//! memory while it decodes. These sequences are refused from their length, before
//! any element is read or any room made for one.

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
use std::marker::PhantomData;

/// Most functions a plugin may export.
pub const MAX_EXPORTS: usize = 10_000;
/// Most headers of an HTTP request a plugin asks the supervisor to make.
pub const MAX_FETCH_HEADERS: usize = 256;

struct AtMost<T, const N: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for AtMost<T, N> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at most {N} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        if let Some(n) = seq.size_hint()
            && n > N
        {
            return Err(A::Error::invalid_length(n, &self));
        }
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(x) = seq.next_element()? {
            if out.len() == N {
                return Err(A::Error::invalid_length(N + 1, &self));
            }
            out.push(x);
        }
        Ok(out)
    }
}

fn at_most<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(AtMost::<T, N>(PhantomData))
}

pub(crate) fn exports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    at_most::<D, String, MAX_EXPORTS>(d)
}

pub(crate) fn headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    at_most::<D, (String, String), MAX_FETCH_HEADERS>(d)
}
