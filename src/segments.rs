//! A body frame made of several byte strings, sent with one vectored write: how a spliced page
//! leaves the proxy. Its recorded bytes go out as slices of the recording, not copied, with the
//! visitor's ID (and any short run of recorded bytes around it) in small buffers between them.
//! Every other body sends one byte string per frame, which costs nothing more than a `Bytes`.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Byte strings in order, read as one buffer. `first` is the front one; `rest` is allocated only
/// for a frame of more than one.
#[derive(Debug, Default)]
pub struct Segments {
    first: Bytes,
    rest: VecDeque<Bytes>,
    remaining: usize,
}

impl Segments {
    /// Adds `bytes` at the end (an empty one is left out).
    pub fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.remaining += bytes.len();
        if self.first.is_empty() {
            self.first = bytes;
        } else {
            self.rest.push_back(bytes);
        }
    }

    /// Adds every byte string of `other` at the end.
    pub fn append(&mut self, other: Segments) {
        self.push(other.first);
        for bytes in other.rest {
            self.push(bytes);
        }
    }

    pub fn len(&self) -> usize {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// The bytes as one string: free for one segment, a copy for more.
    pub fn into_bytes(self) -> Bytes {
        if self.rest.is_empty() {
            return self.first;
        }
        let mut out = Vec::with_capacity(self.remaining);
        out.extend_from_slice(&self.first);
        for bytes in &self.rest {
            out.extend_from_slice(bytes);
        }
        Bytes::from(out)
    }
}

impl From<Bytes> for Segments {
    fn from(bytes: Bytes) -> Segments {
        Segments {
            remaining: bytes.len(),
            first: bytes,
            rest: VecDeque::new(),
        }
    }
}

impl Buf for Segments {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        &self.first
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(
            cnt <= self.remaining,
            "advance past the end: {cnt} of {}",
            self.remaining
        );
        self.remaining -= cnt;
        while cnt > 0 {
            if cnt < self.first.len() {
                self.first.advance(cnt);
                return;
            }
            cnt -= self.first.len();
            self.first = self.rest.pop_front().unwrap_or_default();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for bytes in std::iter::once(&self.first).chain(&self.rest) {
            if n == dst.len() || bytes.is_empty() {
                break;
            }
            dst[n] = IoSlice::new(bytes);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(parts: &[&'static str]) -> Segments {
        let mut s = Segments::default();
        for p in parts {
            s.push(Bytes::from_static(p.as_bytes()));
        }
        s
    }

    /// Reads `s` the way a writer does: vectored, advancing by `step` bytes at most.
    fn drain(mut s: Segments, step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while s.has_remaining() {
            let mut slices = [IoSlice::new(&[]); 3];
            let n = s.chunks_vectored(&mut slices);
            assert!(n > 0, "bytes remain but no slice was given");
            let mut took = 0;
            for slice in &slices[..n] {
                let want = (step - took).min(slice.len());
                out.extend_from_slice(&slice[..want]);
                took += want;
                if took == step {
                    break;
                }
            }
            s.advance(took);
        }
        out
    }

    #[test]
    fn reads_every_byte_in_order_whatever_the_steps() {
        let parts = ["<a href=\"x?kmi=", "", "id", "\">", "rest of the page", "!"];
        let whole: String = parts.concat();
        for step in 1..=whole.len() + 1 {
            assert_eq!(drain(of(&parts), step), whole.as_bytes(), "step {step}");
        }
        let s = of(&parts);
        assert_eq!(s.len(), whole.len());
        assert_eq!(s.into_bytes(), whole.as_bytes());
    }

    #[test]
    fn appends_and_flattens() {
        let mut a = of(&["ab", "c"]);
        a.append(of(&["", "de"]));
        a.append(Segments::default());
        assert_eq!(a.len(), 5);
        assert_eq!(a.copy_to_bytes(5), &b"abcde"[..]);
        assert!(a.is_empty());
        assert_eq!(of(&["one"]).into_bytes(), &b"one"[..]);
        assert!(Segments::default().into_bytes().is_empty());
    }

    #[test]
    #[should_panic(expected = "advance past the end")]
    fn advancing_past_the_end_panics() {
        of(&["ab"]).advance(3);
    }
}
