//! `quic_streams`: what one request costs on a QUIC stream of its own (the
//! protocol's choice) against a long-lived stream that carries request
//! after request (one per request in flight), with the members' own TLS
//! (mutual, development certificates) and transport settings, on loopback.
//! The server echoes a 128-byte frame; nothing else happens, so the figures
//! are the transport's alone.
//!
//! `cargo run --release -p flashstock-benches --bin quic_streams`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;

const FRAME_BYTES: usize = 128;
const RUN_SECONDS: f64 = 3.0;

async fn read_frame(receive: &mut quinn::RecvStream) -> anyhow::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    match receive.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
    receive.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

async fn write_frame(send: &mut quinn::SendStream, payload: &[u8]) -> anyhow::Result<()> {
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    send.write_all(&frame).await?;
    Ok(())
}

/// Echoes every frame of every stream until the peer finishes it.
async fn serve(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else { return };
            while let Ok((mut send, mut receive)) = connection.accept_bi().await {
                tokio::spawn(async move {
                    while let Ok(Some(frame)) = read_frame(&mut receive).await {
                        if write_frame(&mut send, &frame).await.is_err() {
                            return;
                        }
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    StreamPerRequest,
    LongLivedStreams,
}

async fn run(connection: &quinn::Connection, mode: Mode, in_flight: usize) -> anyhow::Result<(f64, Histogram<u64>)> {
    let deadline = Instant::now() + Duration::from_secs_f64(RUN_SECONDS);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (connection, done) = (connection.clone(), done.clone());
        tasks.spawn(async move {
            let mut latency = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
            let payload = [7u8; FRAME_BYTES];
            let mut long_lived = match mode {
                Mode::LongLivedStreams => Some(connection.open_bi().await?),
                Mode::StreamPerRequest => None,
            };
            while Instant::now() < deadline {
                let begun = Instant::now();
                match long_lived.as_mut() {
                    Some((send, receive)) => {
                        write_frame(send, &payload).await?;
                        read_frame(receive).await?.context("the stream ended")?;
                    }
                    None => {
                        let (mut send, mut receive) = connection.open_bi().await?;
                        write_frame(&mut send, &payload).await?;
                        send.finish()?;
                        read_frame(&mut receive).await?.context("no answer")?;
                    }
                }
                latency.saturating_record(u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                done.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((mut send, _)) = long_lived {
                send.shutdown().await.ok();
            }
            anyhow::Ok(latency)
        });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    while let Some(joined) = tasks.join_next().await {
        latency.add(joined??)?;
    }
    Ok((done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(), latency))
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let directory = std::env::temp_dir().join(format!("flashstock-quic-bench-{}", std::process::id()));
        flashstock_node::tls::create_development_certificates(&directory, &[1])?;
        let roots = flashstock_node::tls::load_roots(&directory)?;
        let transport = Arc::new(flashstock_node::server::transport_config(
            &flashstock_node::config::NetworkSection::default(),
        )?);

        let server_tls = flashstock_node::tls::server_crypto(
            roots.clone(),
            flashstock_node::tls::Identity::load(&directory, "node-1")?,
        )?;
        let mut server_config =
            quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?));
        server_config.transport_config(transport.clone());
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
        let address = server.local_addr()?;
        tokio::spawn(serve(server));

        let client_tls = flashstock_client::tls::client_crypto(
            roots,
            flashstock_node::tls::Identity::load(&directory, "checkout")?,
        )?;
        let mut client_config =
            quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?));
        client_config.transport_config(transport);
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client.set_default_client_config(client_config);
        let connection = client.connect(address, &flashstock_client::tls::node_name(1))?.await?;

        println!("| in flight | stream per request: requests/s (p50 / p99) | long-lived streams: requests/s (p50 / p99) | ratio |");
        println!("|---|---|---|---|");
        for in_flight in [1, 64, 256] {
            let (per_request, per_request_latency) = run(&connection, Mode::StreamPerRequest, in_flight).await?;
            let (long_lived, long_lived_latency) = run(&connection, Mode::LongLivedStreams, in_flight).await?;
            let ms = |histogram: &Histogram<u64>, quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
            println!(
                "| {in_flight} | {per_request:.0} ({:.2} / {:.2} ms) | {long_lived:.0} ({:.2} / {:.2} ms) | {:.2}x |",
                ms(&per_request_latency, 0.5),
                ms(&per_request_latency, 0.99),
                ms(&long_lived_latency, 0.5),
                ms(&long_lived_latency, 0.99),
                long_lived / per_request.max(1e-9)
            );
        }
        connection.close(0u32.into(), b"done");
        let _ = std::fs::remove_dir_all(&directory);
        anyhow::Ok(())
    })
}
