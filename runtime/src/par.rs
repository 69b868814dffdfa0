//! A scoped parallel map for start-up work (reading and decoding weights, packing them): the caller
//! and one more thread per other core claim items one at a time from a shared counter, so one large
//! item (AlexBN's fc6) does not leave a core idle behind a fixed split. Results come back in item
//! order, so a caller is as deterministic as the sequential loop it replaces; the threads end before
//! `map` returns.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `items.iter().map(f).collect()`, computed on up to every core.
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = vec![];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { return done };
            done.push((i, f(item)));
        }
    };
    // The caller works too rather than wait: a thread fewer to start, and no core idle meanwhile.
    let parts: Vec<Vec<(usize, R)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mine = work();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).chain([mine]).collect()
    });
    let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    for (i, r) in parts.into_iter().flatten() {
        out[i] = Some(r);
    }
    out.into_iter().map(|r| r.expect("every item is claimed once")).collect()
}

/// Calls `f(i, chunk)` on the `i`-th `size`-element chunk of `out` (the last may be shorter), on up to
/// every core.
pub fn chunks_mut<T: Send>(out: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunks: Vec<std::sync::Mutex<&mut [T]>> = out.chunks_mut(size.max(1)).map(std::sync::Mutex::new).collect();
    let ids: Vec<usize> = (0..chunks.len()).collect();
    map(&ids, |&i| f(i, &mut chunks[i].lock().unwrap_or_else(|e| e.into_inner())));
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_item_order() {
        let items: Vec<u64> = (0..1000).collect();
        assert_eq!(super::map(&items, |&i| i * i), items.iter().map(|&i| i * i).collect::<Vec<_>>());
        assert!(super::map(&[] as &[u8], |_| 0).is_empty());
        let mut v = vec![0usize; 1001];
        super::chunks_mut(&mut v, 100, |i, c| c.iter_mut().enumerate().for_each(|(j, x)| *x = i * 100 + j));
        assert_eq!(v, (0..1001).collect::<Vec<_>>());
    }
}
