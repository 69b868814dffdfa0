//! A dense, row-major (C order) f32 tensor: the only data type cnnc moves between kernels.
//! Its values are its own, or (weights read from a memory-mapped file) a read-only window onto memory
//! that another owner keeps alive; a write copies the window first.

use std::fmt;
use std::sync::Arc;

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Floats,
}

/// Where a tensor's values live.
#[derive(Clone)]
enum Floats {
    Owned(Vec<f32>),
    Shared(Shared),
}

/// Bytes that [`Shared`] tensors read: a memory-mapped weights file.
pub trait Backing: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// The pages of `range` may leave the process's resident memory; touched again, they come back
    /// with the same bytes (a mapped file's pages are the page cache's).
    fn release(&self, _range: std::ops::Range<usize>) {}
}

/// `len` little-endian f32 values at byte `start` of bytes `owner` keeps (a mapped weights file),
/// checked in bounds and aligned when made. Dropped, it releases its pages: a model's weights are
/// resident while read and packed, not all at once beside their packed copies.
#[derive(Clone)]
pub struct Shared {
    owner: Arc<dyn Backing>,
    start: usize,
    len: usize,
}

impl Shared {
    /// `None` where the values would pass the end of the bytes, or do not start on a multiple of 4
    /// bytes in memory (an f32 slice must), or the machine is big-endian.
    pub fn new(owner: Arc<dyn Backing>, start: usize, len: usize) -> Option<Shared> {
        let bytes = owner.bytes().get(start..start.checked_add(len.checked_mul(4)?)?)?;
        (cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok()).then_some(Shared { owner, start, len })
    }

    fn floats(&self) -> &[f32] {
        bytemuck::cast_slice(&self.owner.bytes()[self.start..self.start + 4 * self.len])
    }

    /// Lets the values' pages go until they are read again.
    pub fn release(&self) {
        self.owner.release(self.start..self.start + 4 * self.len);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.release();
    }
}

/// The data length does not match the shape's element count.
#[derive(Debug, thiserror::Error)]
#[error("shape {shape:?} needs {} values, got {len}", shape.iter().product::<usize>())]
pub struct ShapeMismatch {
    pub shape: Vec<usize>,
    pub len: usize,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ShapeMismatch> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(ShapeMismatch { shape, len: data.len() });
        }
        Ok(Tensor { shape, data: Floats::Owned(data) })
    }

    /// A tensor over values another owner keeps.
    pub fn shared(shape: Vec<usize>, data: Shared) -> Result<Self, ShapeMismatch> {
        if shape.iter().product::<usize>() != data.len {
            return Err(ShapeMismatch { shape, len: data.len });
        }
        Ok(Tensor { shape, data: Floats::Shared(data) })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        Self::full(shape, 0.0)
    }

    pub fn full(shape: Vec<usize>, value: f32) -> Self {
        let n = shape.iter().product();
        Tensor { shape, data: Floats::Owned(vec![value; n]) }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        match &self.data {
            Floats::Owned(v) => v,
            Floats::Shared(s) => s.floats(),
        }
    }

    /// The values, copied first if they are shared.
    pub fn data_mut(&mut self) -> &mut [f32] {
        if let Floats::Shared(s) = &self.data {
            self.data = Floats::Owned(s.floats().to_vec());
        }
        match &mut self.data {
            Floats::Owned(v) => v,
            Floats::Shared(_) => unreachable!("copied above"),
        }
    }

    pub fn into_data(self) -> Vec<f32> {
        match self.data {
            Floats::Owned(v) => v,
            Floats::Shared(s) => s.floats().to_vec(),
        }
    }

    /// Lets shared values' pages go until they are read again (see [`Backing::release`]).
    pub fn release(&self) {
        if let Floats::Shared(s) = &self.data {
            s.release();
        }
    }

    /// The tensor's own buffer, to be reused; `None` where its values are shared.
    pub fn into_owned(self) -> Option<Vec<f32>> {
        match self.data {
            Floats::Owned(v) => Some(v),
            Floats::Shared(_) => None,
        }
    }

    /// Same data, new shape of equal size.
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Self, ShapeMismatch> {
        match self.data {
            Floats::Owned(v) => Tensor::new(shape, v),
            Floats::Shared(s) => Tensor::shared(shape, s),
        }
    }

    /// The leading (batch) dimension.
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Largest |a − b| over all elements (shapes must match).
    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        assert_eq!(self.shape, other.shape, "max_abs_diff of tensors with different shapes");
        self.data().iter().zip(other.data()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    /// Largest |x|.
    pub fn max_abs(&self) -> f32 {
        self.data().iter().fold(0.0f32, |m, x| m.max(x.abs()))
    }
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        self.shape == other.shape && self.data() == other.data()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: Vec<_> = self.data().iter().take(6).collect();
        write!(f, "Tensor{:?} {head:?}{}", self.shape, if self.data().len() > 6 { "…" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::{Backing, Shared, Tensor};
    use std::sync::{Arc, Mutex};

    /// Bytes that count the releases asked of them.
    struct Counted(Vec<u8>, Mutex<usize>);

    impl Backing for Counted {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn release(&self, _: std::ops::Range<usize>) {
            *self.1.lock().unwrap() += 1;
        }
    }

    #[test]
    fn shared_values_are_read_in_place_and_copied_on_write() {
        let values = [1.5f32, -2.0, 3.25];
        let mut bytes: Vec<u8> = vec![0; 4];
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let owner = Arc::new(Counted(bytes, Mutex::new(0)));
        // A Vec<u8>'s buffer is aligned to at least 4 by the allocator; 1 byte further is not.
        assert!(Shared::new(owner.clone(), 1, 3).is_none(), "misaligned");
        assert!(Shared::new(owner.clone(), 4, 4).is_none(), "past the end");
        let t = Tensor::shared(vec![3], Shared::new(owner.clone(), 4, 3).expect("aligned, in bounds")).expect("3 values");
        assert!(Tensor::shared(vec![2], Shared::new(owner.clone(), 4, 3).unwrap()).is_err());
        assert_eq!(t, Tensor::new(vec![3], values.to_vec()).unwrap());
        let mut copy = t.clone();
        copy.data_mut()[0] = 7.0;
        assert_eq!((t.data()[0], copy.data()[0]), (1.5, 7.0), "a write copies the shared values");
        assert!(copy.into_owned().is_some() && t.clone().into_owned().is_none());
        let released = *owner.1.lock().unwrap();
        drop(t);
        assert!(*owner.1.lock().unwrap() > released, "a dropped window releases its pages");
    }
}
