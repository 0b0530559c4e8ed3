//! A byte-budgeted LRU cache of metadata tables (L2 tables, decompressed clusters), shared by every
//! image of a mount.
//!
//! The cache is split into shards, each behind its own short-held mutex, so that threads reading
//! different tables rarely meet: a lookup locks one shard just long enough to clone an `Arc`.
//! Loads happen outside any lock; two threads missing on the same table may both read it, which is
//! harmless (the tables are immutable once published).

use std::hash::Hash;

use lru::LruCache;
use parking_lot::Mutex;

/// Identifies a cached item: which image file, and which host offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub image: u64,
    pub offset: u64,
}

const SHARD_BITS: u32 = 4;
const SHARDS: usize = 1 << SHARD_BITS;

struct Shard<V> {
    entries: LruCache<CacheKey, (V, u64)>,
    bytes: u64,
    // Counted here, under the lock a lookup holds anyway: one shared counter for all threads
    // was a cache line every lookup of every thread wrote to.
    hits: u64,
    misses: u64,
}

/// An LRU cache with a budget in bytes. `V` is cheap to clone (an `Arc`).
pub struct ByteLru<V: Clone> {
    shards: Vec<Mutex<Shard<V>>>,
    budget_per_shard: u64,
}

impl<V: Clone> ByteLru<V> {
    /// A cache holding at most `budget` bytes (at least one item per shard is always kept, so that
    /// a tiny budget still works).
    pub fn new(budget: u64) -> Self {
        ByteLru {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: LruCache::unbounded(),
                        bytes: 0,
                        hits: 0,
                        misses: 0,
                    })
                })
                .collect(),
            budget_per_shard: budget / SHARDS as u64,
        }
    }

    fn shard(&self, key: &CacheKey) -> &Mutex<Shard<V>> {
        // Every lookup of every read comes here: a multiplicative mix of the two words spreads
        // the tables (cluster-aligned offsets, so the low bits say nothing) over the shards at
        // a fraction of the cost of SipHash. An image crafted to put its tables on one shard
        // only gets less cache (a shard's share of the budget), never wrong data.
        let mixed = (key.offset ^ key.image.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        &self.shards[(mixed >> (64 - SHARD_BITS)) as usize]
    }

    pub fn get(&self, key: &CacheKey) -> Option<V> {
        let mut shard = self.shard(key).lock();
        let found = shard.entries.get(key).map(|(v, _)| v.clone());
        if found.is_some() {
            shard.hits += 1;
        } else {
            shard.misses += 1;
        }
        found
    }

    /// Inserts `value`, which costs `bytes` of the budget, evicting the least recently used items.
    pub fn insert(&self, key: CacheKey, value: V, bytes: u64) {
        let mut shard = self.shard(&key).lock();
        if let Some((_, old)) = shard.entries.put(key, (value, bytes)) {
            shard.bytes -= old;
        }
        shard.bytes += bytes;
        self.evict(&mut shard);
    }

    /// Looks `key` up, loading and inserting it with `load` on a miss.
    pub fn get_or_load<E>(
        &self,
        key: CacheKey,
        load: impl FnOnce() -> Result<(V, u64), E>,
    ) -> Result<V, E> {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let (value, bytes) = load()?;
        self.insert(key, value.clone(), bytes);
        Ok(value)
    }

    /// Like [`ByteLru::get_or_load`], but the loaded value is kept only if `still_valid()` holds
    /// when it is inserted (checked under the shard lock, so a concurrent [`ByteLru::publish`] of
    /// a newer value is never overwritten by a stale load).
    pub fn get_or_load_checked<E>(
        &self,
        key: CacheKey,
        load: impl FnOnce() -> Result<(V, u64), E>,
        still_valid: impl FnOnce() -> bool,
    ) -> Result<V, E> {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let (value, bytes) = load()?;
        let mut shard = self.shard(&key).lock();
        if still_valid() && !shard.entries.contains(&key) {
            shard.entries.put(key, (value.clone(), bytes));
            shard.bytes += bytes;
            self.evict(&mut shard);
        }
        Ok(value)
    }

    /// Replaces the value at `key` with a newer one; `before` runs under the shard lock first
    /// (it bumps the generation that [`ByteLru::get_or_load_checked`] checks).
    pub fn publish(&self, key: CacheKey, value: V, bytes: u64, before: impl FnOnce()) {
        let mut shard = self.shard(&key).lock();
        before();
        if let Some((_, old)) = shard.entries.put(key, (value, bytes)) {
            shard.bytes -= old;
        }
        shard.bytes += bytes;
        self.evict(&mut shard);
    }

    fn evict(&self, shard: &mut Shard<V>) {
        while shard.bytes > self.budget_per_shard && shard.entries.len() > 1 {
            match shard.entries.pop_lru() {
                Some((_, (_, cost))) => shard.bytes -= cost,
                None => break,
            }
        }
    }

    /// Drops every item of `image` at `offset` (after the table there changed or was freed).
    pub fn remove(&self, key: &CacheKey) {
        let mut shard = self.shard(key).lock();
        if let Some((_, cost)) = shard.entries.pop(key) {
            shard.bytes -= cost;
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(hits, misses), shard| {
            let shard = shard.lock();
            (hits + shard.hits, misses + shard.misses)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn evicts_to_stay_within_budget() {
        let cache: ByteLru<Arc<[u8]>> = ByteLru::new(16 * 1024);
        for i in 0..1000 {
            cache.insert(
                CacheKey {
                    image: 1,
                    offset: i * 512,
                },
                vec![0u8; 512].into(),
                512,
            );
        }
        assert!(cache.bytes() <= 16 * 1024, "{}", cache.bytes());
        assert!(cache.bytes() >= 8 * 1024);
    }

    #[test]
    fn get_or_load_loads_once_then_hits() {
        let cache: ByteLru<u64> = ByteLru::new(1 << 20);
        let key = CacheKey {
            image: 7,
            offset: 0x10000,
        };
        let v: Result<u64, ()> = cache.get_or_load(key, || Ok((42, 8)));
        assert_eq!(v, Ok(42));
        let v: Result<u64, ()> = cache.get_or_load(key, || panic!("must hit"));
        assert_eq!(v, Ok(42));
        assert_eq!(cache.stats(), (1, 1));
        cache.remove(&key);
        assert_eq!(cache.get(&key), None);
    }
}
