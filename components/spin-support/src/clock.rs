//! Clocks, waiting and randomness (WASI).

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds on the WASI monotonic clock (for deadlines).
pub fn monotonic_ms() -> u64 {
    spin_sdk::wasip3::clocks::monotonic_clock::now() / 1_000_000
}

/// Waits `ms` milliseconds (WASI monotonic clock).
pub async fn wait_ms(ms: u64) {
    spin_sdk::wasip3::clocks::monotonic_clock::wait_for(ms.saturating_mul(1_000_000)).await;
}

/// A random number.
pub fn random_u32() -> u32 {
    spin_sdk::wasip3::random::random::get_random_u64() as u32
}

/// A random token (lease and lock owner).
pub fn token() -> String {
    let r = spin_sdk::wasip3::random::random::get_random_bytes(16);
    hex::encode(r)
}
