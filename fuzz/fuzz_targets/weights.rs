//! A weights file (Chainer npz or safetensors, told apart by content) → every array it holds, or an
//! error. Headers are untrusted: declared sizes never allocate more than the bytes present allow.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(w) = cnnc::weights::Weights::from_bytes("fuzz.npz".into(), data.to_vec()) else { return };
    for key in w.keys().into_iter().take(64) {
        if let Ok((shape, values)) = w.read(&key, None) {
            let values = values.expect("every array is read when no shape is asked for");
            assert_eq!((shape.as_slice(), shape.iter().product::<usize>()), (values.shape(), values.data().len()), "`{key}`: shape and values agree");
        }
    }
});
