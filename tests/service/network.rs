//! Network faults between the service and Kinesis, through a small fault-injecting TCP proxy:
//! connections reset mid-subscription and mid-PutRecords, a 2 s stall, a 20 s black hole.
//! The service recovers by itself, loses nothing, and /readyz reports the outage while it lasts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::helpers::*;

/// Forwards TCP to the emulator; can hold every byte (black hole) or cut every connection.
struct TcpProxy {
    url: String,
    holding: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    holding: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while holding.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl TcpProxy {
    async fn start(upstream: &str) -> TcpProxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let holding = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (hold, conns) = (Arc::clone(&holding), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(&upstream).await else { continue };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                let up = tokio::spawn(pump(in_read, out_write, Arc::clone(&hold)));
                let down = tokio::spawn(pump(out_read, in_write, Arc::clone(&hold)));
                conns.lock().unwrap().extend([up.abort_handle(), down.abort_handle()]);
            }
        });
        TcpProxy { url, holding, connections }
    }

    /// Cuts every open connection (the service sees resets and early EOFs).
    fn reset(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn hold(&self, on: bool) {
        self.holding.store(on, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_stalls_and_a_black_hole_lose_nothing() {
    let (emulator, client) = with_streams(&[("in", 2), ("out-1", 1), ("out-2", 2)]).await;
    let proxy = TcpProxy::start(&emulator.url).await;
    let (_dir, checkpoint) = temp_checkpoint();
    let service = Running::start(&TestConfig::new(&proxy.url).checkpoint_file(&checkpoint).toml(), &proxy.url);
    wait_until("ready", || async { service.get("/readyz").await.0 == 200 }).await;

    let mut all: Vec<Rec> = Vec::new();
    let outputs = ["out-1", "out-2"];

    // Resets while subscriptions stream and PutRecords are in flight.
    for round in 0..5u64 {
        let batch = records(800 + round, 400, 64);
        put_all(&client, "in", &batch).await;
        all.extend(batch);
        tokio::time::sleep(Duration::from_millis(120)).await;
        proxy.reset();
    }
    wait_until("everything after resets", || all_hold(&client, &outputs, &all)).await;

    // A 2-second stall.
    proxy.hold(true);
    let batch = records(810, 400, 64);
    put_all(&client, "in", &batch).await;
    all.extend(batch);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.hold(false);
    wait_until("everything after a stall", || all_hold(&client, &outputs, &all)).await;

    // A 20-second black hole: readiness drops while it lasts, and comes back by itself.
    proxy.hold(true);
    let batch = records(820, 400, 64);
    put_all(&client, "in", &batch).await;
    all.extend(batch);
    wait_until("/readyz reports the outage", || async {
        let (status, body) = service.get("/readyz").await;
        status == 503 && body.contains("no subscription event")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.hold(false);
    wait_until("ready again", || async { service.get("/readyz").await.0 == 200 }).await;
    let batch = records(830, 400, 64);
    put_all(&client, "in", &batch).await;
    all.extend(batch);
    wait_until("everything after the black hole", || all_hold(&client, &outputs, &all)).await;
    service.stop().await.unwrap();
}
