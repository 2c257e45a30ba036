//! Automatic prefix caching (vLLM's): every full block of a sequence's
//! tokens is identified by a hash of its tokens and of everything before it
//! (a hash chain), so two sequences that start alike find the same blocks.
//! A new sequence takes the longest chain of cached blocks that starts its
//! prompt — the very blocks, shared (`KvCache::with_blocks`), not copies —
//! and prefills only the rest. Entries no sequence holds are evicted least
//! recently used first when the pool runs short.

use crate::cache::paged::KvBlock;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// One cached block: its tokens (checked on a hit, so a hash collision is
/// a miss, never wrong keys) and its keys and values, one block per paged
/// layer.
struct Entry {
    tokens: Vec<u32>,
    layers: Vec<Arc<KvBlock>>,
    last_used: u64,
    depth: usize,
}

#[derive(Default)]
pub struct PrefixCache {
    map: HashMap<u64, Entry>,
    tick: u64,
}

/// The chain hash of block `tokens` after the blocks hashed to `prev`.
fn chain(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    /// Blocks cached.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The longest run of cached blocks that starts `tokens`, leaving at
    /// least two tokens to compute (the next token's logits come from the
    /// last; one token alone would take the decode path, whose numbers
    /// differ from a prefill's): per paged layer, its blocks in order.
    pub fn lookup(&mut self, tokens: &[u32], bt: usize) -> Vec<Vec<Arc<KvBlock>>> {
        self.tick += 1;
        let mut h = 0;
        let n = tokens.len().saturating_sub(2) / bt;
        let mut hashes = vec![];
        for b in 0..n {
            let blk = &tokens[b * bt..][..bt];
            h = chain(h, blk);
            match self.map.get(&h) {
                Some(e) if e.tokens == blk => hashes.push(h),
                _ => break,
            }
        }
        for h in &hashes {
            if let Some(e) = self.map.get_mut(h) {
                e.last_used = self.tick;
            }
        }
        let found: Vec<&Entry> = hashes.iter().map(|h| &self.map[h]).collect();
        let layers = found.first().map_or(0, |e| e.layers.len());
        (0..layers)
            .map(|l| found.iter().map(|e| e.layers[l].clone()).collect())
            .collect()
    }

    /// Cache the full blocks of a sequence: `tokens` are those its caches
    /// hold, `layers[l]` the block table of paged layer l.
    pub fn insert(&mut self, tokens: &[u32], layers: &[&[Arc<KvBlock>]], bt: usize) {
        self.tick += 1;
        let full = layers
            .iter()
            .map(|l| l.len())
            .min()
            .unwrap_or(0)
            .min(tokens.len() / bt);
        let mut h = 0;
        for b in 0..full {
            let blk = &tokens[b * bt..][..bt];
            h = chain(h, blk);
            let tick = self.tick;
            let e = self.map.entry(h).or_insert_with(|| Entry {
                tokens: blk.to_vec(),
                layers: layers.iter().map(|l| l[b].clone()).collect(),
                last_used: tick,
                depth: b,
            });
            if e.tokens != blk {
                // a collision: keep the older entry, stop the chain here
                return;
            }
            e.last_used = tick;
        }
    }

    /// Drop the least recently used entry whose blocks no sequence holds
    /// (the deepest first among equals, so chains shrink from the end).
    /// Returns the blocks it freed, 0 when every entry is in use.
    pub fn evict_one(&mut self) -> usize {
        let victim = self
            .map
            .iter()
            .filter(|(_, e)| e.layers.iter().all(|b| Arc::strong_count(b) == 1))
            .min_by_key(|(_, e)| (e.last_used, std::cmp::Reverse(e.depth)))
            .map(|(h, _)| *h);
        match victim.and_then(|h| self.map.remove(&h)) {
            Some(e) => e.layers.len(),
            None => 0,
        }
    }

    /// Drop every entry no sequence holds.
    pub fn clear_unused(&mut self) {
        self.map
            .retain(|_, e| e.layers.iter().any(|b| Arc::strong_count(b) > 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::paged::BlockPool;
    use crate::kernels::kv::KvDType;

    #[test]
    fn a_prefix_is_found_by_its_chain_and_evicted_when_unused() {
        let pool = BlockPool::new(KvDType::F32, 1, 4, 2, 100).unwrap();
        let blocks: Vec<Arc<KvBlock>> = (0..3).map(|_| Arc::new(pool.alloc().unwrap())).collect();
        let mut pc = PrefixCache::default();
        // tokens 1..=7: three full blocks of 2 (the 7th token is partial)
        let toks = [1, 2, 3, 4, 5, 6, 7];
        pc.insert(&toks, &[&blocks], 2);
        assert_eq!(pc.len(), 3);
        // the same start: all three blocks (8 tokens leave two to compute)
        let toks8 = [1, 2, 3, 4, 5, 6, 7, 8];
        let hit = pc.lookup(&toks8, 2);
        assert_eq!(hit.len(), 1);
        assert_eq!(hit[0].len(), 3);
        assert!(Arc::ptr_eq(&hit[0][2], &blocks[2]));
        // 7 tokens: only 2 blocks (two tokens must be computed)
        assert_eq!(pc.lookup(&toks, 2)[0].len(), 2);
        // a different second block: only the first matches
        assert_eq!(pc.lookup(&[1, 2, 9, 9, 5, 6, 7], 2)[0].len(), 1);
        // a different first block: nothing, even if later blocks agree
        assert!(pc.lookup(&[0, 2, 3, 4, 5, 6, 7], 2).is_empty());
        // in use: nothing to evict; unused: evicted deepest first
        assert_eq!(pc.evict_one(), 0);
        drop((blocks, hit));
        assert_eq!(pc.evict_one(), 1);
        assert_eq!(pc.lookup(&toks8, 2)[0].len(), 2);
        pc.clear_unused();
        assert!(pc.is_empty());
        assert_eq!(pool.used(), 0);
    }
}
