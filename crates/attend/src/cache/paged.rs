//! Paged KV storage, as vLLM's PagedAttention keeps it (on the CPU): a
//! cache's rows live in fixed-size blocks of `block_tokens` tokens drawn
//! from one pool per model, and a sequence's cache is its block table (the
//! blocks in order). So
//!
//! * memory is bounded: the pool holds at most `capacity` blocks, whatever
//!   the number of sequences, and the server admits work against it;
//! * a sequence wastes at most one partly filled block;
//! * blocks are shared: a block is an `Arc`, a sequence that starts with a
//!   cached prefix holds the very blocks another sequence wrote (prefix
//!   caching), and a shared block is copied before it is written
//!   (copy-on-write).
//!
//! A block holds one layer's keys and values of one sequence's tokens:
//! per KV head, `block_tokens` rows of head_dim numbers in the cache's type
//! (head-major, as a contiguous cache holds them), keys then values.
//! `KvRows::paged` reads them in place.

use crate::error::{Error, Result};
use crate::kernels::kv::KvDType;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Where blocks come from: a bounded count and a free list of buffers (a
/// freed block's memory is reused, not returned to the allocator and
/// faulted in again).
#[derive(Clone)]
pub struct BlockPool(Arc<PoolInner>);

struct PoolInner {
    dtype: KvDType,
    h_kv: usize,
    hd: usize,
    tokens: usize,
    capacity: usize,
    used: AtomicUsize,
    spare: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockPool({}/{} blocks of {} tokens)",
            self.used(),
            self.capacity(),
            self.block_tokens()
        )
    }
}

impl BlockPool {
    /// A pool of at most `capacity` blocks of `block_tokens` tokens for
    /// caches of `h_kv` heads of `hd` numbers in `dtype`.
    pub fn new(
        dtype: KvDType,
        h_kv: usize,
        hd: usize,
        block_tokens: usize,
        capacity: usize,
    ) -> Result<Self> {
        if block_tokens == 0 {
            return Err(Error::config("kv-block", "must be at least 1 token"));
        }
        if !hd.is_multiple_of(dtype.block()) {
            return Err(Error::msg(format!(
                "a {dtype} KV cache stores blocks of {} numbers per head; this model's heads have {hd}",
                dtype.block()
            )));
        }
        Ok(Self(Arc::new(PoolInner {
            dtype,
            h_kv,
            hd,
            tokens: block_tokens,
            capacity,
            used: AtomicUsize::new(0),
            spare: Mutex::new(vec![]),
        })))
    }

    pub fn dtype(&self) -> KvDType {
        self.0.dtype
    }

    pub fn kv_heads(&self) -> usize {
        self.0.h_kv
    }

    pub fn head_dim(&self) -> usize {
        self.0.hd
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.0.tokens
    }

    /// Most blocks the pool hands out.
    pub fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// Blocks alive now (held by caches or a prefix cache).
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Acquire)
    }

    pub fn free_blocks(&self) -> usize {
        self.capacity().saturating_sub(self.used())
    }

    /// Bytes of one block: keys and values of every KV head.
    pub fn block_bytes(&self) -> usize {
        let p = &self.0;
        2 * p.h_kv * p.tokens * p.dtype.bytes(p.hd)
    }

    /// Whether two pools are one.
    pub fn same(&self, other: &BlockPool) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// A fresh block, or an error when the pool is at capacity.
    pub fn alloc(&self) -> Result<KvBlock> {
        let p = &self.0;
        let mut n = p.used.load(Ordering::Acquire);
        loop {
            if n >= p.capacity {
                return Err(Error::msg(format!(
                    "the paged KV cache is full ({} blocks of {} tokens; raise --kv-memory)",
                    p.capacity, p.tokens
                )));
            }
            match p
                .used
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        let bytes = self.block_bytes();
        let data = p
            .spare
            .lock()
            .expect("pool lock")
            .pop()
            .unwrap_or_else(|| vec![0u8; bytes]);
        Ok(KvBlock {
            data,
            pool: self.0.clone(),
        })
    }
}

/// One block: per KV head `block_tokens` key rows, then as many value
/// rows, in the pool's KV type. Dropping it returns it to the pool.
pub struct KvBlock {
    data: Vec<u8>,
    pool: Arc<PoolInner>,
}

impl std::fmt::Debug for KvBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvBlock({} bytes)", self.data.len())
    }
}

impl KvBlock {
    /// A copy from the same pool (copy-on-write).
    pub fn copy(&self) -> Result<KvBlock> {
        let mut b = BlockPool(self.pool.clone()).alloc()?;
        b.data.copy_from_slice(&self.data);
        Ok(b)
    }

    /// Rows of KV head g: (keys, values), each block_tokens rows.
    pub fn head(&self, g: usize) -> (&[u8], &[u8]) {
        let p = &self.pool;
        let n = p.tokens * p.dtype.bytes(p.hd);
        let (k, v) = self.data.split_at(p.h_kv * n);
        (&k[g * n..][..n], &v[g * n..][..n])
    }

    /// Write token row r of KV head g (already encoded rows of the pool's
    /// type).
    pub fn write(&mut self, g: usize, r: usize, k: &[u8], v: &[u8]) {
        let p = &self.pool;
        let rb = p.dtype.bytes(p.hd);
        let n = p.tokens * rb;
        let half = p.h_kv * n;
        self.data[g * n + r * rb..][..rb].copy_from_slice(k);
        self.data[half + g * n + r * rb..][..rb].copy_from_slice(v);
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.pool.used.fetch_sub(1, Ordering::AcqRel);
        let data = std::mem::take(&mut self.data);
        if let Ok(mut spare) = self.pool.spare.lock() {
            spare.push(data);
        }
    }
}

/// A cache's block table: its blocks in token order, shared or its own.
#[derive(Clone, Debug)]
pub struct Pages {
    pub pool: BlockPool,
    pub blocks: Vec<Arc<KvBlock>>,
}

impl Pages {
    /// Store t token rows after the n0 already held: k and v (t, h_kv, hd)
    /// token-major f32, encoded into the pool's type. Blocks are taken
    /// from the pool as needed; a shared block is copied before it is
    /// written.
    pub fn append(&mut self, n0: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (dt, hd, h_kv, bt) = (
            self.pool.dtype(),
            self.pool.head_dim(),
            self.pool.kv_heads(),
            self.pool.block_tokens(),
        );
        let t = k.len() / (h_kv * hd);
        let rb = dt.bytes(hd);
        let (mut kr, mut vr) = (vec![0u8; rb], vec![0u8; rb]);
        for i in 0..t {
            let p = n0 + i;
            let (b, r) = (p / bt, p % bt);
            if b == self.blocks.len() {
                self.blocks.push(Arc::new(self.pool.alloc()?));
            }
            let slot = &mut self.blocks[b];
            if Arc::get_mut(slot).is_none() {
                *slot = Arc::new(slot.copy()?);
            }
            let block = Arc::get_mut(slot).expect("a block of one owner");
            for g in 0..h_kv {
                let at = (i * h_kv + g) * hd;
                dt.encode(&k[at..][..hd], &mut kr);
                dt.encode(&v[at..][..hd], &mut vr);
                block.write(g, r, &kr, &vr);
            }
        }
        Ok(())
    }

    /// Bytes of the blocks in the table.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * self.pool.block_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_bounds_blocks_reuses_them_and_copies_shared_ones_on_write() {
        let pool = BlockPool::new(KvDType::F32, 2, 4, 3, 3).unwrap();
        let mut a = Pages {
            pool: pool.clone(),
            blocks: vec![],
        };
        let row = |x: f32| vec![x; 2 * 4];
        // 4 tokens: 2 blocks
        for i in 0..4 {
            a.append(i, &row(i as f32), &row(-(i as f32))).unwrap();
        }
        assert_eq!((a.blocks.len(), pool.used()), (2, 2));
        // b shares both; writing token 4 into the shared partial block
        // copies it (a keeps its own)
        let mut b = a.clone();
        assert_eq!(pool.used(), 2);
        b.append(4, &row(9.0), &row(-9.0)).unwrap();
        assert_eq!(pool.used(), 3);
        assert!(Arc::ptr_eq(&a.blocks[0], &b.blocks[0]));
        assert!(!Arc::ptr_eq(&a.blocks[1], &b.blocks[1]));
        let f =
            |bytes: &[u8], r: usize| f32::from_le_bytes(bytes[r * 16..][..4].try_into().unwrap());
        // a's second block holds token 3 at row 0 and nothing written at row 1
        assert_eq!(f(a.blocks[1].head(1).0, 0), 3.0);
        assert_eq!(f(b.blocks[1].head(1).0, 1), 9.0);
        assert_eq!(f(b.blocks[1].head(0).1, 1), -9.0);
        // the pool is full: a new block is refused, with the flag to raise
        let mut c = Pages {
            pool: pool.clone(),
            blocks: vec![],
        };
        let e = c.append(0, &row(1.0), &row(1.0)).unwrap_err().to_string();
        assert!(e.contains("--kv-memory"), "{e}");
        // dropping b frees its own block, not the shared one
        drop(b);
        assert_eq!(pool.used(), 2);
        c.append(0, &row(1.0), &row(1.0)).unwrap();
        assert_eq!(pool.used(), 3);
        drop((a, c));
        assert_eq!(pool.used(), 0);
    }
}
