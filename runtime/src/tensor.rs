//! A dense, row-major (C order) f32 tensor: the only data type cnnc moves between kernels.

use std::fmt;

#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
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
        Ok(Tensor { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        Self::full(shape, 0.0)
    }

    pub fn full(shape: Vec<usize>, value: f32) -> Self {
        let n = shape.iter().product();
        Tensor { shape, data: vec![value; n] }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Same data, new shape of equal size.
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Self, ShapeMismatch> {
        Tensor::new(shape, self.data)
    }

    /// The leading (batch) dimension.
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Largest |a − b| over all elements (shapes must match).
    pub fn max_abs_diff(&self, other: &Tensor) -> f32 {
        assert_eq!(self.shape, other.shape, "max_abs_diff of tensors with different shapes");
        self.data.iter().zip(&other.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    /// Largest |x|.
    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0.0f32, |m, x| m.max(x.abs()))
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head: Vec<_> = self.data.iter().take(6).collect();
        write!(f, "Tensor{:?} {head:?}{}", self.shape, if self.data.len() > 6 { "…" } else { "" })
    }
}
