//! The wire codec: little-endian integers written and read field by field into byte slices
//! (no `unsafe`, no transmute), and the `wire_struct!` macro that gives each `#[repr(C)]` wire
//! struct its codec plus a compile-time proof that it has no padding.
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

/// Writes little-endian integers into a byte slice. Running out of room is sticky and reported
/// by [`Writer::finish`], so encoders need no error plumbing and can never panic.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    /// A writer at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            overflow: false,
        }
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, src: &[u8]) {
        let end = self.pos.saturating_add(src.len());
        match self.buf.get_mut(self.pos..end) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(src);
                self.pos = end;
            }
            _ => self.overflow = true,
        }
    }

    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// Bytes written, or `None` if anything did not fit.
    pub fn finish(self) -> Option<usize> {
        (!self.overflow).then_some(self.pos)
    }
}

/// Reads little-endian integers from a byte slice; running short yields zeros and is sticky,
/// reported by [`Reader::finish`].
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    short: bool,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            short: false,
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let end = self.pos.saturating_add(N);
        match self
            .buf
            .get(self.pos..end)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
        {
            Some(a) if !self.short => {
                self.pos = end;
                a
            }
            _ => {
                self.short = true;
                [0; N]
            }
        }
    }

    /// Reads a `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// Reads a `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Bytes consumed, or `None` if the input ran short.
    pub fn finish(self) -> Option<usize> {
        (!self.short).then_some(self.pos)
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }
}

/// A value with a fixed little-endian encoding of [`Field::SIZE`] bytes.
pub trait Field: Sized {
    /// Encoded size; for wire structs also `size_of::<Self>()` (asserted).
    const SIZE: usize;
    /// Appends the encoding.
    fn put(&self, w: &mut Writer<'_>);
    /// Reads one value (zeros when short: check [`Reader::finish`]).
    fn take(r: &mut Reader<'_>) -> Self;

    /// Encodes into the start of `out`; the size written, `None` if `out` is too short.
    fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = Writer::new(out);
        self.put(&mut w);
        w.finish()
    }

    /// Decodes from exactly [`Field::SIZE`] bytes.
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::SIZE {
            return None;
        }
        let mut r = Reader::new(bytes);
        let v = Self::take(&mut r);
        r.finish().map(|_| v)
    }

    /// Decodes from the front of `bytes`; the value and what follows it.
    fn decode_prefix(bytes: &[u8]) -> Option<(Self, &[u8])> {
        let (head, rest) = bytes.split_at_checked(Self::SIZE)?;
        Some((Self::decode(head)?, rest))
    }
}

impl Field for u32 {
    const SIZE: usize = 4;
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(*self);
    }
    fn take(r: &mut Reader<'_>) -> Self {
        r.u32()
    }
}

impl Field for u64 {
    const SIZE: usize = 8;
    fn put(&self, w: &mut Writer<'_>) {
        w.u64(*self);
    }
    fn take(r: &mut Reader<'_>) -> Self {
        r.u64()
    }
}

impl<const N: usize> Field for [u32; N] {
    const SIZE: usize = 4 * N;
    fn put(&self, w: &mut Writer<'_>) {
        for v in self {
            w.u32(*v);
        }
    }
    fn take(r: &mut Reader<'_>) -> Self {
        core::array::from_fn(|_| r.u32())
    }
}

impl<const N: usize> Field for [u64; N] {
    const SIZE: usize = 8 * N;
    fn put(&self, w: &mut Writer<'_>) {
        for v in self {
            w.u64(*v);
        }
    }
    fn take(r: &mut Reader<'_>) -> Self {
        core::array::from_fn(|_| r.u64())
    }
}

/// Declares a `#[repr(C)]` wire struct, its [`Field`] codec (fields in declaration order) and the
/// compile-time proof that the struct has no padding, i.e. that memory and wire layouts agree.
macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t,)* }

        impl Field for $name {
            const SIZE: usize = 0 $(+ <$t as Field>::SIZE)*;
            fn put(&self, w: &mut Writer<'_>) {
                $(self.$f.put(w);)*
            }
            // Inline: compiled only where a struct is decoded. `CpuStats` is 7 KiB, over the
            // 4 KiB a kernel frame may have, and the driver never decodes one.
            #[inline]
            fn take(r: &mut Reader<'_>) -> Self {
                Self { $($f: <$t as Field>::take(r),)* }
            }
        }

        const _: () = assert!(core::mem::size_of::<$name>() == <$name as Field>::SIZE);
    };
}

pub(crate) use wire_struct;
