//! An input `.npy` → a tensor of the model's input shape (one sample or a batch), or an error.
#![no_main]
use cnnc::input::{from_bytes, Preprocess};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut bytes = b"\x93NUMPY".to_vec();
    bytes.extend_from_slice(data);
    for dims in [&[3, 4, 4][..], &[1, 8, 8], &[10]] {
        if let Ok(t) = from_bytes("fuzz.npy".into(), &bytes, dims, &Preprocess::default()) {
            assert_eq!(&t.shape()[1..], dims);
            assert!(t.data().iter().all(|v| v.is_finite()), "non-finite inputs are refused");
        }
    }
});
