//! `--scenario fleet-sim`: the lease protocol at fleet scale, simulated (see
//! `kinesis_fanout::simulation`): the real lease code, coordinator and destination writer of
//! every worker against an in-memory table with DynamoDB's semantics, on a paused clock. One JSON
//! line per case.

use std::time::{Duration, Instant};

use kinesis_fanout::simulation::{self, Event, Scenario};
use serde_json::{Map, Value, json};

fn cases(smoke: bool) -> Vec<Scenario> {
    let seed = 16;
    if smoke {
        return vec![
            Scenario::new("start-40x4", 40, 4, Event::Start, seed),
            Scenario::new("kill-1-of-4", 40, 4, Event::Kill { killed: 1 }, seed),
        ];
    }
    let big = |case: &str, event: Event| Scenario::new(case, 10_000, 100, event, seed);
    vec![
        Scenario::new("start-100x1", 100, 1, Event::Start, seed),
        Scenario::new("start-1000x10", 1_000, 10, Event::Start, seed),
        big("start-10000x100", Event::Start),
        big("add-20-to-80", Event::Add { added: 20 }),
        big("kill-10-of-100", Event::Kill { killed: 10 }),
        big("rolling-deploy-100", Event::RollingDeploy { pace: Duration::from_secs(5) }),
        big("cut-off-3-failovers", Event::CutOff { failovers: 3 }),
        big("throttle-20pct", Event::Throttle { share: 0.2 }),
        big("reshard-1000", Event::Reshard { split: 1_000 }),
    ]
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// Runs every case, each in a paused current-thread runtime of its own thread.
pub fn run(smoke: bool, only: Option<&str>) -> anyhow::Result<Vec<Map<String, Value>>> {
    let mut lines = Vec::new();
    for scenario in cases(smoke).into_iter().filter(|s| only.is_none_or(|c| c == s.case)) {
        let started = Instant::now();
        let report = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
            runtime.block_on(simulation::run(&scenario))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the simulation panicked"))?;
        eprintln!(
            "fleet-sim {}: {:.0} s simulated in {:.1} s, balanced after {:?} s, {} requests checked, {} violations",
            report.case,
            report.simulated_s,
            started.elapsed().as_secs_f64(),
            report.seconds_to_balance.map(|s| round(s, 1)),
            report.requests,
            report.invariant_violations.len()
        );
        for violation in &report.invariant_violations {
            eprintln!("fleet-sim {}: INVARIANT VIOLATED: {violation}", report.case);
        }
        let mut line = Map::new();
        line.insert("case".into(), json!(report.case));
        line.insert("shards".into(), json!(report.shards));
        line.insert("workers".into(), json!(report.workers));
        line.insert("seed".into(), json!(report.seed));
        line.insert("invariant_violations".into(), json!(report.invariant_violations.len()));
        line.insert("seconds_to_balance".into(), json!(report.seconds_to_balance.map(|s| round(s, 1))));
        line.insert("steals".into(), json!(report.steals));
        line.insert("takeovers".into(), json!(report.takeovers));
        line.insert("table_reads_per_s".into(), json!(round(report.table_reads_per_s, 1)));
        line.insert("table_writes_per_s".into(), json!(round(report.table_writes_per_s, 1)));
        line.insert("dollars_per_month".into(), json!(round(report.dollars_per_month, 2)));
        line.insert("price_per_million_reads".into(), json!(simulation::PRICE_PER_MILLION_READS));
        line.insert("price_per_million_writes".into(), json!(simulation::PRICE_PER_MILLION_WRITES));
        line.insert("longest_unread_s".into(), json!(round(report.longest_unread_s, 1)));
        line.insert("longest_failover_s".into(), json!(round(report.longest_failover_s, 1)));
        line.insert("failover_bound_s".into(), json!(round(report.failover_bound_s, 1)));
        line.insert("simulated_s".into(), json!(round(report.simulated_s, 0)));
        line.insert("throttled_calls".into(), json!(report.usage.throttled));
        line.insert("put_requests_checked".into(), json!(report.requests));
        line.insert("records_written".into(), json!(report.records_written));
        line.insert("wall_s".into(), json!(round(started.elapsed().as_secs_f64(), 1)));
        lines.push(line);
    }
    Ok(lines)
}
