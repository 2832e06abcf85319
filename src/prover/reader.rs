//! [`BoundedReader`]: the only way a payload reaches a Miden decoder. Miden's own reader trusts
//! every length it reads: a `Vec` announcing 2^40 elements reserves their capacity before a
//! single element is read, and the process aborts. This reader answers such lengths with a
//! [`DeserializationError`] instead, so the cheap bombs get a precise `INVALID_ARGUMENT` in the
//! prover process before any proving starts.
//!
//! What it checks:
//! - every sequence (`Vec`, `BTreeMap`, `String`, read through `read_many`) announces at most as
//!   many elements as there are bytes left, since each element takes at least one;
//! - a MAST forest (seen by its magic `MAST\0`) announces at most [`MAX_MAST_NODES`] nodes,
//!   no more nodes or decorators than bytes left, and at most [`MAX_MAST_ROOTS`] procedure roots:
//!   Miden inserts roots with a linear search each, so 200,000 roots took 10.9 s to decode.
//!
//! Not every vint is a length: a chain's length (`PartialMmr`'s leaf count) and in-order indices
//! are plain numbers, far larger than a payload on a long chain, so the reader bounds sequences,
//! not numbers. What it cannot see stays bounded by `max_request_size` and the prover process's
//! memory limit: lengths read as fixed-width integers and reserved by a decoder itself
//! (`MerkleStore` reserves `read_u64()` entries), and memory a decoder makes per byte (the MAST
//! string table's ~30 bytes per payload byte). The prover process reports an allocation that
//! fails while decoding as a malformed payload ([`crate::worker::job`]).

use miden_objects::utils::{ByteReader, Deserializable, DeserializationError};

/// Most nodes one MAST forest may announce. Account code, note scripts and transaction scripts
/// are a few hundred to a few thousand nodes; 2^20 leaves room for any real library.
pub const MAX_MAST_NODES: usize = 1 << 20;

/// Most procedure roots one MAST forest may announce. An account component exports tens of
/// procedures; Miden's standard library, the largest forest there is, a few thousand. Decoding
/// costs grow with the square of this number (16,384 roots: ≈ 0.1 s).
pub const MAX_MAST_ROOTS: usize = 1 << 14;

/// The first bytes of a serialized MAST forest.
const MAST_MAGIC: &[u8; 5] = b"MAST\0";

/// A reader over a whole payload that refuses lengths the payload cannot back.
pub struct BoundedReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Counts the vints read since the last MAST magic: node count, decorator count, roots.
    forest_field: Option<u8>,
}

impl<'a> BoundedReader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        BoundedReader { bytes, pos: 0, forest_field: None }
    }

    /// Decodes a whole `T` from `bytes`.
    pub fn decode<T: Deserializable>(bytes: &'a [u8]) -> Result<T, DeserializationError> {
        T::read_from(&mut BoundedReader::new(bytes))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn invalid(&self, what: &str) -> DeserializationError {
        DeserializationError::InvalidValue(format!("at byte {}: {what}", self.pos))
    }

    /// The forest-specific bound on the `index`-th vint after a MAST magic, if any.
    fn check_forest_field(&self, index: u8, value: usize) -> Result<(), DeserializationError> {
        let (name, bound) = match index {
            0 => ("nodes", MAX_MAST_NODES.min(self.remaining())),
            1 => ("decorators", self.remaining()),
            2 => ("procedure roots", MAX_MAST_ROOTS),
            _ => return Ok(()),
        };
        if value > bound {
            return Err(self.invalid(&format!(
                "a MAST forest announces {value} {name}; at most {bound} are accepted here"
            )));
        }
        Ok(())
    }
}

impl ByteReader for BoundedReader<'_> {
    fn read_u8(&mut self) -> Result<u8, DeserializationError> {
        let byte = self.peek_u8()?;
        self.pos += 1;
        Ok(byte)
    }

    fn peek_u8(&self) -> Result<u8, DeserializationError> {
        self.bytes.get(self.pos).copied().ok_or(DeserializationError::UnexpectedEOF)
    }

    fn read_slice(&mut self, len: usize) -> Result<&[u8], DeserializationError> {
        self.check_eor(len)?;
        let slice = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(slice)
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N], DeserializationError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.read_slice(N)?);
        if N == MAST_MAGIC.len() && array[..] == MAST_MAGIC[..] {
            self.forest_field = Some(0);
        }
        Ok(array)
    }

    fn check_eor(&self, num_bytes: usize) -> Result<(), DeserializationError> {
        if num_bytes > self.remaining() {
            return Err(DeserializationError::UnexpectedEOF);
        }
        Ok(())
    }

    fn has_more_bytes(&self) -> bool {
        self.remaining() > 0
    }

    /// vint64, as Miden writes it (the low set bit of the first byte gives the length; `0x00`
    /// starts the 9-byte form); after a MAST magic, bounded as a forest's counts.
    fn read_usize(&mut self) -> Result<usize, DeserializationError> {
        let start = self.pos;
        let first = self.peek_u8()?;
        let length = first.trailing_zeros() as usize + 1;
        let value = if length == 9 {
            self.read_u8()?;
            u64::from_le_bytes(self.read_array::<8>()?)
        } else {
            let mut encoded = [0u8; 8];
            encoded[..length].copy_from_slice(self.read_slice(length)?);
            u64::from_le_bytes(encoded) >> length
        };
        let value = usize::try_from(value).map_err(|_| {
            DeserializationError::InvalidValue(format!(
                "at byte {start}: {value} does not fit this machine's usize"
            ))
        })?;
        if let Some(index) = self.forest_field {
            self.forest_field = (index < 2).then_some(index + 1);
            self.check_forest_field(index, value)?;
        }
        Ok(value)
    }

    /// Like Miden's own, but refuses more elements than bytes left before reserving anything.
    fn read_many<D: Deserializable>(
        &mut self,
        num_elements: usize,
    ) -> Result<Vec<D>, DeserializationError> {
        if num_elements > self.remaining() {
            return Err(self.invalid(&format!(
                "a sequence announces {num_elements} elements but only {} bytes are left",
                self.remaining()
            )));
        }
        let mut result = Vec::with_capacity(num_elements);
        for _ in 0..num_elements {
            result.push(D::read_from(self)?);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use miden_objects::utils::Serializable;

    use super::*;

    #[test]
    fn reads_what_miden_writes() {
        let values: Vec<Vec<u64>> = vec![vec![1, 2, 3], vec![], vec![u64::MAX; 300]];
        let bytes = values.to_bytes();
        assert_eq!(BoundedReader::decode::<Vec<Vec<u64>>>(&bytes).expect("decodes"), values);
        for n in [0usize, 1, 127, 128, 1 << 20, 1 << 40, usize::MAX] {
            let bytes = n.to_bytes();
            assert_eq!(BoundedReader::new(&bytes).read_usize().expect("a vint"), n);
        }
    }

    #[test]
    fn numbers_larger_than_the_payload_are_not_lengths() {
        // A chain of 2^30 blocks: its partial MMR writes the leaf count as a vint.
        use miden_objects::crypto::merkle::{Forest, MmrPeaks, PartialMmr};
        let peaks = MmrPeaks::new(Forest::new(1 << 30), vec![miden_objects::Word::default()])
            .expect("one peak for 2^30 leaves");
        let mmr = PartialMmr::from_peaks(peaks);
        let bytes = mmr.to_bytes();
        assert!(bytes.len() < 1 << 10);
        assert_eq!(BoundedReader::decode::<PartialMmr>(&bytes).expect("decodes"), mmr);
    }

    #[test]
    fn refuses_lengths_the_payload_cannot_back() {
        // The 9-byte form announcing 2^40 elements: Miden's reader aborts the process on it.
        let bomb = [0, 0, 0, 0, 0, 0, 1, 0, 0];
        let err = BoundedReader::decode::<Vec<u64>>(&bomb).expect_err("refused");
        assert!(
            err.to_string().contains("announces 1099511627776 elements but only 0 bytes"),
            "{err}"
        );
        // A length the payload could hold as a number, but not as elements.
        let mut bytes = vec![0u8; 64];
        bytes.extend(100usize.to_bytes());
        bytes.extend([0u8; 40]);
        let err = BoundedReader::decode::<([u8; 64], Vec<u64>)>(&bytes).expect_err("refused");
        assert!(err.to_string().contains("announces 100 elements but only 40 bytes"), "{err}");
    }

    #[test]
    fn bounds_forest_roots() {
        let mut bytes = MAST_MAGIC.to_vec();
        bytes.extend([0, 0, 0]);
        bytes.extend(10usize.to_bytes()); // nodes
        bytes.extend(0usize.to_bytes()); // decorators
        bytes.extend((MAX_MAST_ROOTS + 1).to_bytes()); // roots
        bytes.resize(bytes.len() + 2 * MAX_MAST_ROOTS, 0);
        let mut reader = BoundedReader::new(&bytes);
        let _: [u8; 5] = reader.read_array().expect("magic");
        let _: [u8; 3] = reader.read_array().expect("version");
        assert_eq!(reader.read_usize().expect("nodes"), 10);
        assert_eq!(reader.read_usize().expect("decorators"), 0);
        let err = reader.read_usize().expect_err("too many roots");
        assert!(err.to_string().contains("procedure roots"), "{err}");
    }
}
