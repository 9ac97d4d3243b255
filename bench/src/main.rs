//! `bench`: the design document's spike scenarios against a running stack (issue 7). The flags
//! and the run live in [`bench::cli`].

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    bench::cli::main().await
}
