//! Deterministic jitter for backoffs: SplitMix64 from a seed the caller
//! chooses (pure: the same seed gives the same draws).

/// SplitMix64 draws in `[0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next draw, uniform in `[0, 1)`.
    pub fn draw(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_in_range_and_repeat_for_a_seed() {
        let mut a = Jitter::new(7);
        let mut b = Jitter::new(7);
        let mut c = Jitter::new(8);
        let xs: Vec<f64> = (0..1000).map(|_| a.draw()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(
            xs.iter()
                .zip((0..1000).map(|_| b.draw()))
                .all(|(x, y)| *x == y)
        );
        assert_ne!(xs[0], c.draw());
        let mean = xs.iter().sum::<f64>() / 1000.0;
        assert!((0.45..0.55).contains(&mean), "mean {mean}");
    }
}
