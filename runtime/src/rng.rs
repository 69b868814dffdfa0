//! A counter-based pseudo-random generator (SplitMix64 of a per-key seed), used for deterministic
//! default initialisation and for test weights that a few lines of numpy reproduce bit for bit
//! (`tests/fixtures/gen_fixtures.py`).
//!
//! Value `i` (from 1) of stream `key` is `mix(fnv1a64(key) + i·φ)`. Being counter-based, streams are
//! independent of generation order, and a tensor's values depend only on its Chainer key.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

pub fn fnv1a64(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first `n` 64-bit values of stream `key`.
pub fn bits(key: &str, n: usize) -> impl Iterator<Item = u64> {
    let seed = fnv1a64(key);
    (1..=n as u64).map(move |i| mix(seed.wrapping_add(i.wrapping_mul(GOLDEN))))
}

/// `n` uniforms in [0, 1), each exactly representable as f32 (24 random bits).
pub fn uniform(key: &str, n: usize) -> impl Iterator<Item = f64> {
    bits(key, n).map(|b| (b >> 40) as f64 * (1.0 / (1u64 << 24) as f64))
}

/// `n` standard normals by Box–Muller (the first output of each pair of 53-bit uniforms).
pub fn normal(key: &str, n: usize) -> impl Iterator<Item = f64> {
    let seed = fnv1a64(key);
    (0..n as u64).map(move |j| normal_at(seed, j))
}

/// Normal `j` of the stream with this seed: from its values `2j + 1` and `2j + 2`.
fn normal_at(seed: u64, j: u64) -> f64 {
    let (scale, b) = (1.0 / (1u64 << 53) as f64, |i: u64| mix(seed.wrapping_add(i.wrapping_mul(GOLDEN))) >> 11);
    let (u1, u2) = ((b(2 * j + 1) + 1) as f64 * scale, b(2 * j + 2) as f64 * scale);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `out.len()` normals of stream `key` times `scale`, as f32: [`normal`]'s values, drawn on every core
/// (a few seconds for AlexBN's 62 M parameters on one). Each value depends only on its index, so any
/// number of threads gives the same bytes; the threads end before this returns.
pub fn normal_into(key: &str, scale: f64, out: &mut [f32]) {
    const CHUNK: usize = 1 << 18;
    let seed = fnv1a64(key);
    crate::par::chunks_mut(out, CHUNK, |c, part| {
        for (k, v) in part.iter_mut().enumerate() {
            *v = (normal_at(seed, (c * CHUNK + k) as u64) * scale) as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv_known_values() {
        assert_eq!(super::fnv1a64(""), 0xcbf29ce484222325);
        assert_eq!(super::fnv1a64("a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn parallel_normals_are_the_same_values() {
        let mut out = vec![0f32; 600_000];
        super::normal_into("probe/W", 0.5, &mut out);
        assert!(super::normal("probe/W", out.len()).zip(&out).all(|(v, &o)| (v * 0.5) as f32 == o));
    }

    #[test]
    fn normals_look_normal() {
        let v: Vec<f64> = super::normal("probe", 100_000).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    }
}
