//! An image file (PNG, JPEG, anything the decoder guesses) → a preprocessed tensor for a 3-channel and a
//! 1-channel model, or an error; with the default resize and with one the first byte picks.
#![no_main]
use cnnc::input::{from_bytes, Preprocess};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&r, bytes)) = data.split_first() else { return };
    if bytes.starts_with(b"\x93NUMPY") {
        return;
    }
    for pre in [Preprocess::default(), Preprocess { resize: Some(r as u32 % 64 + 1), ..Preprocess::default() }] {
        for dims in [&[3, 8, 8][..], &[1, 5, 7]] {
            if let Ok(t) = from_bytes("fuzz.img".into(), bytes, dims, &pre) {
                assert_eq!(t.shape(), [&[1][..], dims].concat().as_slice());
            }
        }
    }
});
