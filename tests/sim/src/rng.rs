//! The simulator's one source of randomness: SplitMix64 from a seed.
//! Small and fixed, so that a seed means the same run on every machine and
//! every version of every dependency.

#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "an empty range");
        low + self.next_u64() % (high - low + 1)
    }

    /// Uniform in `0..count`.
    pub fn below(&mut self, count: usize) -> usize {
        assert!(count > 0, "an empty range");
        usize::try_from(self.next_u64() % count as u64).expect("below a usize")
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }

    /// A generator for one part of the run, independent of how much the
    /// others draw.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}
