//! Each thread's own short list of the L2 tables it used last.
//!
//! Every read maps through at least one L2 table, and a read of a chain's live view through one
//! per layer it falls through. The shared cache ([`super::cache::ByteLru`]) answers from behind a
//! shard mutex and hands out a reference-counted table: two threads reading the same tables keep
//! taking those cache lines from each other (a profile of random reads on a 5-layer chain showed
//! 12% of the daemon in that lookup, most of it the lock and the reference count). Here a
//! thread keeps its own references to the tables it used last and reads them without touching
//! any shared line but the image's generation counter, which only writers change.
//!
//! Validity: an entry records the image's L2 generation from before its table was looked up in
//! the shared cache. Every change to an L2 table of an image bumps that generation before the new
//! table is published ([`super::Qcow2Image::publish_l2`]), so an entry whose generation is still
//! current holds what the shared cache would hand out.

use std::cell::RefCell;

use super::l2::L2Table;

/// Slots per thread (a power of two): direct-mapped by table, so a lookup is one probe.
const SLOTS: usize = 64;

/// Bytes of tables one thread may keep beyond the shared cache at most (its entries mostly are
/// the shared cache's own tables, counted once; this bounds what they keep alive after the
/// shared cache dropped them).
const MAX_BYTES_PER_THREAD: u64 = 4 << 20;

struct Entry {
    image: u64,
    offset: u64,
    generation: u64,
    table: L2Table,
}

#[derive(Default)]
struct Recent {
    slots: Vec<Option<Entry>>,
    bytes: u64,
}

thread_local! {
    static RECENT: RefCell<Recent> = RefCell::default();
}

fn slot_of(image: u64, offset: u64) -> usize {
    // Table offsets are cluster-aligned: mix so that the high bits depend on all of them.
    let mixed = (offset ^ image.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> (64 - SLOTS.trailing_zeros())) as usize
}

/// Runs `f` on this thread's copy of the table of `image` at `offset` if it has one of the
/// current `generation`; gives `f` back otherwise.
pub(super) fn with<R, F: FnOnce(&[u64]) -> R>(
    image: u64,
    offset: u64,
    generation: u64,
    f: F,
) -> Result<R, F> {
    RECENT.with(|recent| {
        // A nested use (none exists today) finds the list borrowed and goes to the shared cache.
        let Ok(recent) = recent.try_borrow() else {
            return Err(f);
        };
        match recent.slots.get(slot_of(image, offset)) {
            Some(Some(e))
                if e.image == image && e.offset == offset && e.generation == generation =>
            {
                Ok(f(&e.table))
            }
            _ => Err(f),
        }
    })
}

/// Remembers `table` as the table of `image` at `offset` as of `generation`, within `budget`
/// bytes for this thread.
pub(super) fn remember(image: u64, offset: u64, generation: u64, table: &L2Table, budget: u64) {
    let bytes = table_bytes(table);
    let budget = budget.min(MAX_BYTES_PER_THREAD);
    RECENT.with(|recent| {
        let Ok(mut recent) = recent.try_borrow_mut() else {
            return;
        };
        if recent.slots.is_empty() {
            recent.slots.resize_with(SLOTS, || None);
        }
        let slot = slot_of(image, offset);
        if let Some(old) = recent.slots[slot].take() {
            recent.bytes -= table_bytes(&old.table);
        }
        if recent.bytes + bytes > budget {
            return;
        }
        recent.bytes += bytes;
        recent.slots[slot] = Some(Entry {
            image,
            offset,
            generation,
            table: table.clone(),
        });
    });
}

fn table_bytes(table: &L2Table) -> u64 {
    std::mem::size_of_val::<[u64]>(table) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn table(fill: u64) -> L2Table {
        Arc::from(vec![fill; 512])
    }

    #[test]
    fn answers_only_for_the_same_table_and_generation() {
        remember(1, 0x10000, 5, &table(7), 1 << 20);
        assert_eq!(with(1, 0x10000, 5, |t| t[0]).ok(), Some(7));
        assert!(with(1, 0x10000, 6, |t| t[0]).is_err(), "a newer generation");
        assert!(with(2, 0x10000, 5, |t| t[0]).is_err(), "another image");
        assert!(with(1, 0x20000, 5, |t| t[0]).is_err(), "another table");
        remember(1, 0x10000, 6, &table(8), 1 << 20);
        assert_eq!(with(1, 0x10000, 6, |t| t[0]).ok(), Some(8));
    }

    #[test]
    fn keeps_within_the_budget() {
        for i in 0..SLOTS as u64 * 4 {
            remember(9, i << 16, 0, &table(i), 3 * 4096);
        }
        let bytes = RECENT.with(|r| r.borrow().bytes);
        assert!(bytes <= 3 * 4096, "{bytes}");
        let held = RECENT.with(|r| r.borrow().slots.iter().flatten().count());
        assert!(held >= 1);
    }
}
