//! Running many requests at a fixed concurrency, and the setup every scenario shares: users who
//! are ACTIVE in a schedule's queue (a hold needs an ACTIVE queue token).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use uuid::Uuid;

use super::{Ctx, User};

/// Runs `f(0) … f(n-1)` with at most `concurrency` in flight (that many tasks pulling the next
/// index), advancing `bar`; results in index order.
pub async fn pool<T, F, Fut>(n: usize, concurrency: usize, bar: &ProgressBar, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let (f, next, bar) = (f.clone(), next.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                out.push((i, f(i).await));
                bar.inc(1);
            }
            out
        }));
    }
    let mut all: Vec<(usize, T)> = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("bench task panicked"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// Like [`pool`] for fallible setup steps: the first error wins.
pub async fn try_pool<T, F, Fut>(n: usize, concurrency: usize, bar: &ProgressBar, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    pool(n, concurrency, bar, f).await.into_iter().collect()
}

/// A user with an ACTIVE queue token per schedule (same order as the schedules).
#[derive(Clone, Debug)]
pub struct Booker {
    pub user: User,
    pub tokens: Vec<String>,
}

/// Creates `n` users, charges each `points` (if any), enters each in every schedule's queue and
/// waits until all are ACTIVE.
pub async fn bookers(ctx: &Ctx, n: usize, tag: &str, schedules: &[Uuid], points: Option<i64>, concurrency: usize) -> Result<Vec<Booker>> {
    let bar = ctx.bar(n, &format!("{tag}: users"));
    let (api, run, sched) = (ctx.api.clone(), ctx.run_id.clone(), schedules.to_vec());
    let tag2 = tag.to_string();
    let bookers = try_pool(n, concurrency, &bar, move |i| {
        let (api, run, sched, tag) = (api.clone(), run.clone(), sched.clone(), tag2.clone());
        async move {
            let user = api.create_user(&format!("bench-{run}-{tag}-{i}")).await?;
            if let Some(p) = points {
                api.charge(&user, p).await?;
            }
            let mut tokens = Vec::with_capacity(sched.len());
            for s in &sched {
                tokens.push(api.queue_token(&user, *s).await?);
            }
            Ok(Booker { user, tokens })
        }
    })
    .await?;
    bar.finish_and_clear();
    let pairs: Vec<(User, String)> = bookers.iter().flat_map(|b| b.tokens.iter().map(|t| (b.user.clone(), t.clone()))).collect();
    wait_active(ctx, pairs, tag, concurrency, Duration::from_secs(120)).await?;
    Ok(bookers)
}

/// Polls `GET /v1/queue/tokens/me` for every (user, token) until all are ACTIVE.
pub async fn wait_active(ctx: &Ctx, pairs: Vec<(User, String)>, tag: &str, concurrency: usize, timeout: Duration) -> Result<()> {
    let bar = ctx.bar(pairs.len(), &format!("{tag}: awaiting ACTIVE"));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pending = pairs;
    while !pending.is_empty() {
        let api = ctx.api.clone();
        let list = Arc::new(pending.clone());
        let l2 = list.clone();
        let active = pool(list.len(), concurrency, &ProgressBar::hidden(), move |i| {
            let (api, l) = (api.clone(), l2.clone());
            async move { api.queue_me(&l[i].0, &l[i].1).await.map(|a| a.str("status") == Some("ACTIVE")).unwrap_or(false) }
        })
        .await;
        pending = list.iter().zip(active).filter(|(_, a)| !a).map(|(p, _)| p.clone()).collect();
        bar.set_position((bar.length().unwrap_or(0)).saturating_sub(pending.len() as u64));
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{} queue tokens still not ACTIVE after {timeout:?} (is the api started with large --queue-batch / --queue-max-active?)", pending.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    Ok(())
}

/// A small xorshift generator: the bench needs cheap randomness, not good randomness.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Self {
        let seed = u64::from_le_bytes(Uuid::new_v4().as_bytes()[..8].try_into().expect("8 bytes"));
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}
