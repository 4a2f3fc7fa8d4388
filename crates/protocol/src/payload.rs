//! Payloads (a call's input and output, stored values, bodies) are encoded as one
//! block of bytes rather than a sequence of `u8`s: the same bytes on the wire, but
//! a copy instead of a per-byte loop on both ends, which is what kept a 32 MiB
//! input from crossing within its deadline in a debug build.

/// `#[serde(with = "crate::payload::result")]` for `Result<Vec<u8>, E>`: encoded
/// exactly as serde encodes a `Result` (variant `Ok` = 0, `Err` = 1), the bytes
/// as one block.
pub(crate) mod result {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    #[serde(rename = "Result")]
    enum Ref<'a, E> {
        Ok(#[serde(with = "serde_bytes")] &'a [u8]),
        Err(&'a E),
    }

    #[derive(Deserialize)]
    #[serde(rename = "Result")]
    enum Owned<E> {
        Ok(#[serde(with = "serde_bytes")] Vec<u8>),
        Err(E),
    }

    pub(crate) fn serialize<S: Serializer, E: Serialize>(
        value: &Result<Vec<u8>, E>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Ok(bytes) => Ref::Ok(bytes),
            Err(e) => Ref::<E>::Err(e),
        }
        .serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, E: Deserialize<'de>>(
        d: D,
    ) -> Result<Result<Vec<u8>, E>, D::Error> {
        Ok(match Owned::<E>::deserialize(d)? {
            Owned::Ok(bytes) => Ok(bytes),
            Owned::Err(e) => Err(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{CallError, FromWorker, ToWorker, frame};

    /// The block encoding is byte for byte the encoding of a `Vec<u8>` as a
    /// sequence (a peer built before the change reads it unchanged).
    #[test]
    fn payloads_encode_as_a_sequence_of_bytes_would() {
        #[derive(serde::Serialize)]
        #[expect(
            dead_code,
            reason = "the first two variants hold the indices of FromWorker's"
        )]
        enum PlainFromWorker {
            Loaded,
            LoadFailed,
            CallResult {
                id: u64,
                result: Result<Vec<u8>, CallError>,
            },
        }
        for result in [
            Ok(vec![1u8, 2, 3, 250]),
            Ok(vec![]),
            Err(CallError::Timeout { deadline_ms: 7 }),
        ] {
            let ours = frame::encode(&FromWorker::CallResult {
                id: 9,
                result: result.clone(),
            })
            .unwrap();
            let plain = frame::encode(&PlainFromWorker::CallResult { id: 9, result }).unwrap();
            assert_eq!(ours, plain);
        }
        let big = vec![0xA5u8; 1 << 20];
        let f = frame::encode(&ToWorker::Call {
            id: 1,
            function: "echo".into(),
            input: big.clone(),
            deadline_ms: 5,
            start_by_us: 0,
        })
        .unwrap();
        let mut r = &f[..];
        match frame::read_msg::<ToWorker>(&mut r, frame::MAX_FRAME).unwrap() {
            ToWorker::Call { input, .. } => assert!(input == big),
            other => panic!("{other:?}"),
        }
    }
}
