//! Inputs: images and `.npy` files → one batched NCHW f32 tensor for the model's input.
//!
//! Images are preprocessed as Chainer's imagenet example does at test time (documented in `docs/cli.md`):
//! resize so the shorter side is [`Preprocess::resize`] (triangle filter), center-crop to the model's input
//! size, RGB, CHW, values in 0..255, minus the per-channel mean, times the scale. An image that already has
//! the input's size is taken as it is unless a resize is asked for. Grayscale images are expanded to RGB
//! and alpha is dropped; a one-channel model takes the luma, minus the mean of the three channel means. A
//! `.npy` is a raw float tensor (N,C,H,W) or (C,H,W), used as is.

use crate::weights::{check_npy_header, read_npy, NpyError};
use cnnc_runtime::op::Batched;
use cnnc_runtime::Tensor;
use image::GenericImageView;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// Length of the shorter side after resizing, before the center crop; `None`: 256, except that an
    /// image of exactly the model's input size is not resized.
    pub resize: Option<u32>,
    /// Subtracted per RGB channel (ImageNet means, 0..255 scale).
    pub mean: [f32; 3],
    /// Multiplied after the mean is subtracted.
    pub scale: f32,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess { resize: None, mean: [123.68, 116.78, 103.94], scale: 1.0 / 255.0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read input `{path}`")]
    Io { path: String, source: std::io::Error },
    #[error("input `{path}` is not a readable image or .npy file: {reason}")]
    Decode { path: String, reason: String },
    #[error("input `{path}` has shape {got:?}, but the model takes {} (or one sample without the batch axis)", Batched(expected))]
    Shape { path: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("input `{path}` has dtype {dtype}; .npy inputs must be float32, float64 or float16")]
    Dtype { path: String, dtype: String },
    #[error("input `{path}`: images need a model input of shape [3, H, W] or [1, H, W], but the model takes {}", Batched(expected))]
    NotImageModel { path: String, expected: Vec<usize> },
    #[error("input `{path}`: after resizing to a shorter side of {resize}, the image is {w}x{h}, smaller than the model's {cw}x{ch} input (raise --resize)")]
    TooSmall { path: String, resize: u32, w: u32, h: u32, cw: usize, ch: usize },
    #[error("input `{path}` is a truncated JPEG: its data ends before the end-of-image marker")]
    Truncated { path: String },
    #[error("input `{path}` holds non-finite values (NaN or infinity)")]
    NonFinite { path: String },
    #[error("input `{path}`: the preprocessing (--mean {mean:?}, --scale {scale:e}) takes its pixels past the float range")]
    Overflow { path: String, mean: [f32; 3], scale: f32 },
    #[error("input `{path}` is a {w}x{h} image ({} Mpixel); cnnc decodes images of at most {} Mpixel: shrink it first", (*.w as u64 * *.h as u64) >> 20, MAX_RESIZED_PIXELS >> 20)]
    TooLarge { path: String, w: u32, h: u32 },
    #[error("input `{path}`: a {w}x{h} image would be resized to {nw}x{nh} (shorter side {resize}), more than cnnc's limit of {} Mpixel; {}", MAX_RESIZED_PIXELS >> 20,
        if *.flag { "lower --resize" } else { "crop it closer to the model's aspect ratio first" })]
    TooElongated { path: String, w: u32, h: u32, nw: u64, nh: u64, resize: u32, flag: bool },
}

/// Largest image decoded, and largest resized image (64 Mpixel, 192 MiB of RGB): far beyond any
/// sensible crop of a CNN input.
const MAX_RESIZED_PIXELS: u64 = 1 << 26;

/// Loads one input file as a batch for a model whose input has per-sample shape `dims`.
pub fn load(path: &Path, dims: &[usize], pre: &Preprocess) -> Result<Tensor, InputError> {
    let p = path.display().to_string();
    let bytes = crate::weights::read_within_memory(path).map_err(|source| InputError::Io { path: p.clone(), source })?;
    from_bytes(p, &bytes, dims, pre)
}

/// One input file's `bytes` (an image or a `.npy`), named `p` in messages, as [`load`] reads it.
pub fn from_bytes(p: String, bytes: &[u8], dims: &[usize], pre: &Preprocess) -> Result<Tensor, InputError> {
    let is_npy = bytes.starts_with(b"\x93NUMPY");
    let t = if is_npy { npy(&p, bytes, dims)? } else { image(&p, bytes, dims, pre)? };
    if t.data().iter().any(|v| !v.is_finite()) {
        // An image's pixels are finite: only --mean and --scale can have made them infinite.
        return Err(if is_npy { InputError::NonFinite { path: p } } else { InputError::Overflow { path: p, mean: pre.mean, scale: pre.scale } });
    }
    Ok(t)
}

fn npy(p: &str, bytes: &[u8], dims: &[usize]) -> Result<Tensor, InputError> {
    check_npy_header(bytes).map_err(|reason| InputError::Decode { path: p.into(), reason })?;
    let f = npyz::NpyFile::new(bytes).map_err(|e| InputError::Decode { path: p.into(), reason: e.to_string() })?;
    let (shape, data) = read_npy(f, None).map_err(|e| match e {
        NpyError::Dtype(dtype) => InputError::Dtype { path: p.into(), dtype },
        NpyError::Bad(reason) => InputError::Decode { path: p.into(), reason },
    })?;
    let batched = if shape.len() == dims.len() && shape == dims {
        [&[1][..], &shape].concat()
    } else if shape.len() == dims.len() + 1 && shape[1..] == *dims && shape[0] > 0 {
        shape.clone()
    } else {
        return Err(InputError::Shape { path: p.into(), got: shape, expected: dims.to_vec() });
    };
    Ok(Tensor::new(batched, data).expect("npy data matches its shape"))
}

fn image(p: &str, bytes: &[u8], dims: &[usize], pre: &Preprocess) -> Result<Tensor, InputError> {
    let &[channels @ (1 | 3), ch, cw] = dims else {
        return Err(InputError::NotImageModel { path: p.into(), expected: dims.to_vec() });
    };
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_complete(bytes) {
        return Err(InputError::Truncated { path: p.into() });
    }
    // The header's size, before decoding: the decoder would only say "Memory limit exceeded".
    let reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| InputError::Decode { path: p.into(), reason: e.to_string() })?;
    if let Ok((w, h)) = reader.into_dimensions() {
        if w as u64 * h as u64 > MAX_RESIZED_PIXELS {
            return Err(InputError::TooLarge { path: p.into(), w, h });
        }
    }
    let decoded = image::load_from_memory(bytes).map_err(|e| InputError::Decode { path: p.into(), reason: e.to_string() })?;
    let img = if channels == 1 { image::DynamicImage::ImageLuma8(decoded.to_luma8()) } else { image::DynamicImage::ImageRgb8(decoded.to_rgb8()) };
    let (w, h) = img.dimensions();
    let resize = match pre.resize {
        Some(r) => r,
        None if (w as usize, h as usize) == (cw, ch) => w.min(h),
        None => 256,
    };
    let r = resize as u64;
    // Shorter side → `resize`, keeping the aspect ratio (rounded to the nearest pixel).
    let (nw, nh) = if w <= h { (r, (h as u64 * r + w as u64 / 2) / w as u64) } else { ((w as u64 * r + h as u64 / 2) / h as u64, r) };
    // Resizing a 1×60000 strip to a shorter side of 256 would allocate gigabytes before the crop.
    if nw * nh > MAX_RESIZED_PIXELS {
        return Err(InputError::TooElongated { path: p.into(), w, h, nw, nh, resize, flag: pre.resize.is_some() });
    }
    let (nw, nh) = (nw.max(1) as u32, nh.max(1) as u32);
    if (nw as usize) < cw || (nh as usize) < ch {
        return Err(InputError::TooSmall { path: p.into(), resize, w: nw, h: nh, cw, ch });
    }
    let resized = if (nw, nh) == (w, h) { img } else { img.resize_exact(nw, nh, image::imageops::FilterType::Triangle) };
    let (top, left) = ((nh as usize - ch) / 2, (nw as usize - cw) / 2);
    let mean = |c: usize| if channels == 1 { pre.mean.iter().sum::<f32>() / 3.0 } else { pre.mean[c] };
    let chw = (0..channels).flat_map(|c| (0..ch).flat_map(move |y| (0..cw).map(move |x| (c, y, x))));
    let data = chw.map(|(c, y, x)| (resized.get_pixel((left + x) as u32, (top + y) as u32)[c] as f32 - mean(c)) * pre.scale).collect();
    Ok(Tensor::new(vec![1, channels, ch, cw], data).expect("channels*ch*cw values"))
}

/// Whether a JPEG runs to its end-of-image marker. Decoders fill the rows of a truncated file with grey
/// and report no error, and half an image would be classified as a whole one. Walks the marker segments
/// (lengths given), each scan's entropy-coded data to the next marker (FF 00 is a stuffed byte, FF D0–D7
/// restarts), and more segments and scans (progressive JPEGs) until EOI.
fn jpeg_complete(b: &[u8]) -> bool {
    let mut i = 2;
    while i + 2 <= b.len() {
        let m = b[i + 1];
        match (b[i], m) {
            (0xFF, 0xD9) => return true,
            (0xFF, 0xFF) => i += 1,
            (0xFF, 0xD0..=0xD7 | 0x01) => i += 2,
            (0xFF, _) if i + 4 <= b.len() => {
                i += 2 + u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
                if m == 0xDA {
                    while i + 1 < b.len() && !(b[i] == 0xFF && b[i + 1] != 0 && !(0xD0..=0xD7).contains(&b[i + 1])) {
                        i += 1;
                    }
                }
            }
            _ => return false,
        }
    }
    false
}

/// Concatenates batches along the batch axis.
pub fn concat_batches(parts: Vec<Tensor>) -> Tensor {
    let mut shape = parts[0].shape().to_vec();
    shape[0] = parts.iter().map(Tensor::batch).sum();
    let data = parts.into_iter().flat_map(Tensor::into_data).collect();
    Tensor::new(shape, data).expect("same per-sample shape")
}
