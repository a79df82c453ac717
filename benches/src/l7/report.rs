//! `wrk`'s output read, and the L7 table written.

use std::fmt::Write as _;

use anyhow::Context as _;

use super::{CONNECTIONS, Proxy, ROUNDS, Row, Scenario};

/// What one `wrk` run reported.
#[derive(Debug, PartialEq)]
pub(super) struct Wrk {
    pub(super) requests: u64,
    /// How long it ran, by its own clock.
    pub(super) secs: f64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    /// Socket errors (connect, read, write, timeout) and answers other
    /// than 2xx/3xx.
    pub(super) errors: u64,
}

/// A duration as `wrk` prints it (`290.00us`, `1.23ms`, `2.00s`, `1.00m`),
/// in µs.
fn wrk_duration_us(t: &str) -> Option<f64> {
    for (unit, us) in [
        ("us", 1.0),
        ("ms", 1e3),
        ("s", 1e6),
        ("m", 60e6),
        ("h", 3600e6),
    ] {
        if let Some(v) = t.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * us);
        }
    }
    None
}

pub(super) fn parse_wrk(out: &str) -> anyhow::Result<Wrk> {
    let percentile = |p: &str| {
        out.lines()
            .find_map(|l| wrk_duration_us(l.trim().strip_prefix(p)?.trim()))
            .with_context(|| format!("no {p} latency (was --latency given?)"))
    };
    // "  1002345 requests in 10.00s, 150.34MB read"
    let (requests, secs) = out
        .lines()
        .find_map(|l| {
            let (n, rest) = l.split_once(" requests in ")?;
            let took = rest.split(',').next()?.trim();
            Some((n.trim().parse().ok()?, wrk_duration_us(took)? / 1e6))
        })
        .context("no `N requests in T` line")?;
    let count = |prefix: &str| -> u64 {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .flat_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
            })
            .sum()
    };
    Ok(Wrk {
        requests,
        secs,
        p50_us: percentile("50%")?,
        p99_us: percentile("99%")?,
        errors: count("Socket errors:") + count("Non-2xx or 3xx responses:"),
    })
}

/// `why` for a table cell: its first line, at most 200 characters (the
/// whole of it is in bench.json and was printed as the run went).
fn cell(why: &str) -> String {
    let line = why.lines().next().unwrap_or_default().replace('|', "/");
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

pub(super) fn latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1e3)
    }
}

/// "`a` against `b`": which leads on rate and on requests per core-second,
/// by how much (bold where `b` leads), and both p99s.
fn reading(a: &Row, b: &Row) -> String {
    let lead = |what: &str, av: f64, bv: f64| {
        let (win, lose, x) = if av >= bv {
            (a, b, av / bv.max(1e-9))
        } else {
            (b, a, bv / av.max(1e-9))
        };
        let text = format!("{} leads on {what}: {x:.2}× {}'s", win.proxy, lose.proxy);
        if std::ptr::eq(win, a) {
            text
        } else {
            format!("**{text}**")
        }
    };
    // Rounds whose ranges overlap cannot tell the two apart.
    let noise = if a.requests_per_sec_min <= b.requests_per_sec_max
        && b.requests_per_sec_min <= a.requests_per_sec_max
    {
        " The rounds' rate ranges overlap: the rate difference is within this run's noise."
    } else {
        ""
    };
    format!(
        "- {} against {}: {}; {}; p99 {} against {}.{noise}",
        a.proxy,
        b.proxy,
        lead("requests a second", a.requests_per_sec, b.requests_per_sec),
        lead(
            "requests per proxy core-second",
            a.requests_per_proxy_core_second,
            b.requests_per_proxy_core_second
        ),
        latency(a.p99_us),
        latency(b.p99_us),
    )
}

/// The L7 table, scenario by scenario, with a plain reading of Sluice
/// against each baseline in each.
pub(crate) fn table(s: &mut String, rows: &[Row], secs: u32) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n#### L7: HTTP/1.1 reverse proxies (namespace testbed, 2 nginx backends; `wrk -t1 -c{CONNECTIONS}`, kept alive; \
         proxies interleaved, {ROUNDS} rounds of {secs} s, a fresh testbed each)\n"
    );
    let _ = writeln!(
        s,
        "| scenario | proxy | requests/s, median (min–max) | proxy CPU (cores) | requests per proxy core-second | machine CPU a request | p50 | p99 | backend connections opened | errors |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        let sc = r.scenario.label();
        if let Some(why) = &r.unavailable {
            let _ = writeln!(
                s,
                "| {sc} | {} ({}) | {} | | | | | | | |",
                r.proxy,
                r.setup,
                cell(why)
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {sc} | {} ({}) | {:.0} ({:.0}–{:.0}) | {:.2} | {:.0} | {:.1} µs | {} | {} | {:.0} | {} |",
            r.proxy,
            r.setup,
            r.requests_per_sec,
            r.requests_per_sec_min,
            r.requests_per_sec_max,
            r.proxy_cores,
            r.requests_per_proxy_core_second,
            r.machine_us_per_request,
            latency(r.p50_us),
            latency(r.p99_us),
            r.backend_connections,
            r.errors
        );
    }
    let _ = writeln!(
        s,
        "\nEach proxy in the host namespace on the VIP's port 80, forwarding every request to the same two \
         backends over pooled kept-alive connections. *1 worker*: HAProxy `nbthread 1`, nginx \
         `worker_processes 1`, the agent pinned to CPU 0 (so its distributor has one worker thread), `wrk` on \
         CPU 1. *2 workers*: `nbthread 2`, `worker_processes 2`, the agent on CPUs 0 and 1 (two worker \
         threads), `wrk` anywhere (a 2-CPU machine shares its CPUs between the proxy and the client: compare \
         requests per proxy core-second). *Keyed*: every request carries `X-User: user-N`, N cycling over \
         1,000 users (a `wrk` Lua script), and each proxy routes on it (Sluice: through its units and \
         owners; HAProxy and nginx: consistent hashing). Backends: nginx, one worker each, \
         `return 200 \"ok\\n\"`. Medians over the rounds. *Proxy CPU*: utime + stime of the proxy's \
         processes and threads over the measured run (tick accounting: includes softirq work run in their \
         context), in CPU seconds a second. *Machine CPU a request*: every CPU's busy time (/proc/stat) over \
         the requests, `wrk`, the backends and anything else the machine runs included. Latency: \
         `wrk --latency` percentiles. *Backend connections opened*: what the two backends accepted during \
         the measured run (nginx `stub_status`); with pooling at work, at most about the pool's size. \
         *Errors*: socket errors and answers other than 2xx/3xx, all rounds.\n"
    );
    let mut scenarios: Vec<Scenario> = rows.iter().map(|r| r.scenario).collect();
    scenarios.dedup();
    for sc in scenarios {
        let of = |p: Proxy| {
            rows.iter()
                .find(|r| r.scenario == sc && r.proxy == p.name() && r.unavailable.is_none())
        };
        let _ = writeln!(s, "\n{}:\n", sc.label());
        match of(Proxy::Sluice) {
            Some(sl) => {
                for b in [Proxy::Haproxy, Proxy::Nginx, Proxy::SluiceBaseline] {
                    if let Some(b) = of(b) {
                        let _ = writeln!(s, "{}", reading(sl, b));
                    }
                }
            }
            None => {
                let _ = writeln!(
                    s,
                    "- Sluice was not measured (the reason is in its row): no comparison with it."
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let out = "Running 10s test @ http://198.18.1.1:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   305.19us  100.53us   3.68ms   83.70%
    Req/Sec   100.71k     3.12k  105.00k    83.00%
  Latency Distribution
     50%  290.00us
     75%  340.00us
     90%  410.00us
     99%    1.25ms
  1002345 requests in 10.00s, 150.34MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec: 100134.12
Transfer/sec:     15.03MB
";
        let w = parse_wrk(out).expect("parses");
        assert_eq!(
            w,
            Wrk {
                requests: 1_002_345,
                secs: 10.0,
                p50_us: 290.0,
                p99_us: 1250.0,
                errors: 15,
            }
        );
        let clean = out
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse_wrk(&clean).expect("parses").errors, 0);
        assert!(
            parse_wrk(&out.replace("99%", "98%")).is_err(),
            "a missing percentile is an error"
        );
    }
}
