//! What one client can do to the L7 distributor's other clients: break its
//! own uploads, dribble them, abandon them, send a GET with a body, or meet
//! an instance that answers before it has read the body. Real agent, real
//! servers in the instances, clients in the client namespace.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::Method;
use sluice_tests::{
    http::{self, Framing},
    l7bed::{PORT, backends, config, connect, get_as, metric, metrics, start, testbed, vip},
    netns,
};

/// A connection to the VIP from the client namespace.
fn dial(client: &str) -> TcpStream {
    let s = netns::run_in(client, || {
        TcpStream::connect_timeout(&vip(), Duration::from_secs(2))
    })
    .expect("connecting to the VIP");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(3)))
        .expect("write timeout");
    s
}

/// The status of the first response on `s`, if one comes before it closes
/// or its read timeout.
fn status(s: &mut TcpStream) -> Option<u16> {
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 65_536 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&got);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One kind of hostile upload, on a fresh connection, keyed to `user`;
/// the status the client got, if any.
fn hostile(kind: usize, client: &str, user: usize) -> Option<u16> {
    let mut s = dial(client);
    let head =
        |len: &str| format!("POST /upload HTTP/1.1\r\nHost: a\r\nX-User: u{user}\r\n{len}\r\n\r\n");
    match kind {
        // A malformed chunk size.
        0 => {
            let req = head("Transfer-Encoding: chunked") + "5\r\nhello\r\nZZ\r\nxx\r\n0\r\n\r\n";
            s.write_all(req.as_bytes()).ok()?;
            status(&mut s)
        }
        // 2,000 bytes over a second, past the 500 ms response timeout.
        1 => {
            s.write_all(head("Content-Length: 2000").as_bytes()).ok()?;
            for _ in 0..20 {
                s.write_all(&[b'x'; 100]).ok()?;
                std::thread::sleep(Duration::from_millis(50));
            }
            status(&mut s)
        }
        // 40 KiB of a 100 KiB body, then gone: past the distributor's
        // buffer, so the body was being streamed to an instance.
        2 => {
            s.write_all(head("Content-Length: 100000").as_bytes())
                .ok()?;
            s.write_all(&vec![b'x'; 40_960]).ok()?;
            std::thread::sleep(Duration::from_millis(50));
            None
        }
        // A short body cut short.
        _ => {
            s.write_all(head("Content-Length: 5000").as_bytes()).ok()?;
            s.write_all(&[b'x'; 1000]).ok()?;
            None
        }
    }
}

#[test]
fn one_client_breaking_its_uploads_takes_no_instance_down() {
    let tb = testbed("l7abuse", 2);
    let _servers = backends(&tb);
    let run = start(
        &tb,
        "l7abuse",
        &config(
            &tb,
            "key = { header = \"X-User\" }\nresponse_timeout_ms = 500",
            "",
        ),
    );
    let mut good = connect(&tb);
    assert_eq!(get_as(&mut good, "/", &[("x-user", "warm")]).status, 200);

    // Four attackers, one a kind, for 5 s; each upload on a connection of
    // its own, keyed to a user of its own so every instance is hit.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let attackers: Vec<_> = (0..4)
        .map(|kind| {
            let (client, stop, seen) = (tb.client.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                for user in 0..10_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let got = hostile(kind, &client, user);
                    seen.lock().expect("lock").push((kind, got));
                }
            })
        })
        .collect();

    // The other clients, meanwhile: every request answered.
    let start = Instant::now();
    let mut answers = Vec::new();
    for n in 0..400 {
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
        let user = format!("user-{n}");
        answers.push(get_as(&mut good, "/", &[("x-user", &user)]).status);
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker");
    }
    let bad: Vec<_> = answers.iter().filter(|s| **s != 200).collect();
    assert!(
        answers.len() >= 50 && bad.is_empty(),
        "{} of {} requests of other clients not answered 200, the first: {:?}",
        bad.len(),
        answers.len(),
        &bad[..bad.len().min(10)]
    );
    let seen = seen.lock().expect("lock").clone();
    let of = |kind| seen.iter().filter(move |(k, _)| *k == kind);
    assert!(
        of(0).count() > 0 && of(0).all(|(_, s)| *s == Some(400)),
        "a malformed chunk is answered 400: {:?}",
        of(0).collect::<Vec<_>>()
    );
    assert!(
        of(1).count() > 0 && of(1).all(|(_, s)| *s == Some(200)),
        "a slow upload is answered once whole: {:?}",
        of(1).collect::<Vec<_>>()
    );
    let m = metrics(&tb);
    assert!(metric(&m, "sluice_http_refused_total", &["reason=\"bad_request\""]) >= 1.0);
    assert!(
        metric(&m, "sluice_http_refused_total", &["reason=\"no_instance\""]) < 0.5,
        "no instance was ejected"
    );
    drop(run);
}

#[test]
fn a_get_or_head_with_a_chunked_body_reaches_the_instance_with_it() {
    let tb = testbed("l7getbody", 1);
    let servers = backends(&tb);
    let run = start(&tb, "l7getbody", &config(&tb, "", ""));
    // One body read whole by the distributor, one streamed past its buffer.
    for len in [300, 200_000] {
        let reply = netns::run_in(&tb.client, || {
            http::stream_upload_as(Method::GET, vip(), "/upload", len, true)
        })
        .expect("GET with a body");
        assert_eq!(reply.status, 200, "GET with {len} bytes: {}", reply.text());
        assert_eq!(reply.text(), http::upload_reply(len), "the body of {len}");
    }
    let seen = servers[0].seen();
    let gets: Vec<_> = seen.iter().filter(|s| s.path == "/upload").collect();
    assert_eq!(gets.len(), 2, "{seen:?}");
    assert_eq!(
        gets[0].framing,
        Framing::Length(300),
        "a short body, read whole"
    );
    assert_eq!(gets[1].framing, Framing::Chunked, "a long one, streamed");
    drop(run);
}

/// Each connection's request paths, in order.
type PathLog = Arc<Mutex<Vec<Vec<String>>>>;

/// A server of raw bytes. It answers `/upload` at once with 413 and keeps
/// the connection without reading the body, then reads whatever comes next
/// as a request: a desync waiting to happen. `/frame/...` gets one of the
/// framings an instance may use (see [`framed`]), written in pieces;
/// `/echo` its body back as it reads it (see [`echo`]). It logs each
/// connection's request paths.
struct RawInstance {
    stop: Arc<AtomicBool>,
    log: PathLog,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RawInstance {
    fn start(netns: &str, addr: SocketAddr) -> Self {
        let listener = netns::run_in(netns, || TcpListener::bind(addr)).expect("binding");
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, log) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let thread = {
            let (stop, log): (Arc<AtomicBool>, PathLog) = (stop.clone(), Arc::clone(&log));
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let id = {
                                let mut l = log.lock().expect("lock");
                                l.push(Vec::new());
                                l.len() - 1
                            };
                            let (stop, log) = (stop.clone(), log.clone());
                            conns.push(std::thread::spawn(move || serve(s, id, &stop, &log)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => break,
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        Self {
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn log(&self) -> Vec<Vec<String>> {
        self.log.lock().expect("lock").clone()
    }
}

impl Drop for RawInstance {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut s: TcpStream, id: usize, stop: &AtomicBool, log: &Mutex<Vec<Vec<String>>>) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut buf = Vec::new();
    let mut chunk = vec![0; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            log.lock().expect("lock")[id].push(path.clone());
            if path == "/echo" {
                echo(&mut s, &head, &mut buf, &mut chunk);
                return;
            }
            if let Some((pieces, close)) = framed(&path) {
                for p in pieces {
                    if s.write_all(p).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if close {
                    return;
                }
                continue;
            }
            let reply = if path == "/upload" {
                "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n".to_owned()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                    path.len()
                )
            };
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

#[test]
fn a_connection_answered_before_its_body_was_sent_is_never_reused() {
    let tb = testbed("l7early", 1);
    let i = &tb.instances[0];
    let server = RawInstance::start(&i.netns, SocketAddr::new(i.addr_v4.into(), PORT));
    let run = start(&tb, "l7early", &config(&tb, "pool_size = 1", ""));

    // A body past the distributor's buffer, so it is streamed; the instance
    // answers 413 after its head; the rest of the body ends in the start
    // of a request, which the instance would complete with the next one
    // sent on that connection.
    let rest = {
        let mut r = vec![b'x'; 20_000];
        r.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nX-Pad: ");
        r
    };
    let first = vec![b'x'; 40_000];
    let mut up = dial(&tb.client);
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        first.len() + rest.len()
    );
    up.write_all(head.as_bytes()).expect("head");
    up.write_all(&first).expect("first part");
    assert_eq!(status(&mut up), Some(413), "the early answer");
    up.write_all(&rest).expect("the rest");
    std::thread::sleep(Duration::from_millis(300));

    let mut next = connect(&tb);
    let reply = get_as(&mut next, "/next", &[]);
    assert_eq!(
        (reply.status, reply.text()),
        (200, "/next".to_owned()),
        "another client's request got the answer to the rest of the body; \
         requests by connection at the instance: {:?}",
        server.log()
    );
    for paths in server.log() {
        assert!(
            !(paths.iter().any(|p| p == "/upload") && paths.iter().any(|p| p == "/next")),
            "a connection answered early was reused: {paths:?}"
        );
    }
    drop(up);
    drop(run);
}

/// What [`RawInstance`] answers to `/frame/...`: the pieces it writes (a
/// pause between each), and whether it closes the connection after.
fn framed(path: &str) -> Option<(Vec<&'static [u8]>, bool)> {
    Some(match path {
        "/frame/length" => (
            vec![b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 11\r\n\r\nhello", b" world"],
            false,
        ),
        "/frame/chunked" => (
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"a\"\r\nhel",
                b"lo\r\n",
                b"6\r\n world\r",
                b"\n0\r\nX-Trailer: t\r\n\r\n",
            ],
            false,
        ),
        "/frame/interim" => (
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
            ],
            false,
        ),
        // A HEAD's answer: a length, and no body.
        "/frame/head" => (
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"],
            false,
        ),
        "/frame/no-content" => (vec![b"HTTP/1.1 204 No Content\r\n\r\n"], false),
        // No length: the body ends when the connection does.
        "/frame/close" => (
            vec![b"HTTP/1.1 200 OK\r\n\r\nhello", b" world"],
            true,
        ),
        "/frame/not-http" => (vec![b"220 smtp.example ESMTP\r\n\r\n"], true),
        _ => return None,
    })
}

#[test]
fn an_instances_response_is_relayed_whole_in_every_framing_and_its_connection_reused_only_when_framed()
 {
    let tb = testbed("l7frame", 1);
    let i = &tb.instances[0];
    let server = RawInstance::start(&i.netns, SocketAddr::new(i.addr_v4.into(), PORT));
    let run = start(&tb, "l7frame", &config(&tb, "pool_size = 1", ""));

    // One client connection for all: any framing read wrong would show as
    // a wrong body here or in a later answer.
    let mut c = connect(&tb);
    for path in ["/frame/length", "/frame/chunked", "/frame/interim"] {
        let r = get_as(&mut c, path, &[]);
        assert_eq!(
            (r.status, r.text()),
            (200, "hello world".to_owned()),
            "{path}"
        );
    }
    assert!(
        get_as(&mut c, "/frame/interim", &[])
            .header("link")
            .is_none(),
        "an interim response's headers leaked into the final one"
    );
    let head = c
        .send(
            hyper::Request::head("/frame/head")
                .body(bytes::Bytes::new())
                .expect("request"),
        )
        .expect("HEAD");
    assert_eq!(
        (head.status, head.header("content-length"), head.body.len()),
        (200, Some("1234"), 0),
        "a HEAD's answer keeps its length and has no body"
    );
    let r = get_as(&mut c, "/frame/no-content", &[]);
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = get_as(&mut c, "/frame/close", &[]);
    assert_eq!((r.status, r.text()), (200, "hello world".to_owned()));
    let r = get_as(&mut c, "/frame/not-http", &[]);
    assert_eq!(
        r.status, 502,
        "an answer that is not HTTP is the instance's failure"
    );
    let r = get_as(&mut c, "/after", &[]);
    assert_eq!((r.status, r.text()), (200, "/after".to_owned()));

    // Every framed answer left the connection fit to reuse; a body that
    // ends with the connection, and garbage, did not.
    let log = server.log();
    assert_eq!(
        log,
        vec![
            vec![
                "/frame/length",
                "/frame/chunked",
                "/frame/interim",
                "/frame/interim",
                "/frame/head",
                "/frame/no-content",
                "/frame/close"
            ],
            vec!["/frame/not-http"],
            vec!["/after"],
        ],
        "requests by instance connection"
    );
    drop(run);
}

/// Answers at once, then streams back the request body (of the head's
/// `Content-Length`) as it reads it, chunked, and closes: a full-duplex
/// instance (an echo, a transcoder) that needs the body after its head.
fn echo(s: &mut TcpStream, head: &str, buf: &mut Vec<u8>, chunk: &mut [u8]) {
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        .is_err()
    {
        return;
    }
    let mut left = length;
    let deadline = Instant::now() + Duration::from_secs(5);
    while left > 0 && Instant::now() < deadline {
        if buf.is_empty() {
            match s.read(chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(_) => return,
            }
        }
        let n = left.min(buf.len());
        let mut out = format!("{n:x}\r\n").into_bytes();
        out.extend(buf.drain(..n));
        out.extend_from_slice(b"\r\n");
        if s.write_all(&out).is_err() {
            return;
        }
        left -= n;
    }
    let _ = s.write_all(b"0\r\n\r\n");
}

#[test]
fn an_instance_that_answers_first_and_reads_the_body_after_gets_all_of_it() {
    let tb = testbed("l7echo", 1);
    let i = &tb.instances[0];
    let _server = RawInstance::start(&i.netns, SocketAddr::new(i.addr_v4.into(), PORT));
    let run = start(&tb, "l7echo", &config(&tb, "", ""));

    // Past the distributor's 16 KiB body buffer, so streamed; sent in two
    // parts, the second only once the echo of the first came back.
    let body: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (first, second) = body.split_at(40_000);
    let mut c = dial(&tb.client);
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).expect("head");
    c.write_all(first).expect("first part");
    let mut got = Vec::new();
    let mut buf = vec![0; 65_536];
    let deadline = Instant::now() + Duration::from_secs(8);
    // The response is chunked to the client too: count the body's letters
    // in it (the framing has none of `a`..`z` but hex digits `a`..`f`,
    // which the chunk sizes here never exceed four of).
    let letters = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let body_start = text.find("\r\n\r\n").map_or(text.len(), |i| i + 4);
        text[body_start..]
            .split("\r\n")
            .enumerate()
            .filter(|(k, _)| k % 2 == 1)
            .map(|(_, part)| part.len())
            .sum::<usize>()
    };
    let mut sent_second = false;
    while Instant::now() < deadline && letters(&got) < body.len() {
        if !sent_second && letters(&got) >= first.len() {
            c.write_all(second).expect("second part");
            sent_second = true;
        }
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the echo: {e}"),
        }
    }
    assert!(
        sent_second,
        "the echo of the first part never came back: the instance never got the body after its head ({} bytes in)",
        got.len()
    );
    assert_eq!(
        letters(&got),
        body.len(),
        "the whole body came back through the distributor"
    );
    drop(run);
}
