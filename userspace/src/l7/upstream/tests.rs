use super::*;

fn head(wire: &str, to_head: bool) -> Result<Option<Head>, ReadError> {
    let mut buf = BytesMut::from(wire.as_bytes());
    parse(&mut buf, to_head)
}

fn framed(wire: &str) -> (Framing, bool) {
    let h = head(wire, false).unwrap().expect("a whole head");
    (h.framing, h.keep_alive)
}

#[test]
fn a_response_is_framed_as_rfc_9112_says() {
    let chunked = Framing::Chunked(chunked::Decoder::default());
    let cases = [
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",
            Framing::Length(12),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n",
            Framing::Length(3),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunked,
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            chunked,
            true,
        ),
        // Both framings: chunked wins, the connection is not kept.
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunked,
            false,
        ),
        // Not chunked last: until the connection closes.
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            Framing::Close,
            false,
        ),
        ("HTTP/1.1 200 OK\r\n\r\n", Framing::Close, false),
        (
            "HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            Framing::Empty,
            true,
        ),
        (
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            Framing::Empty,
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive, close\r\n\r\n",
            Framing::Length(4),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\n",
            Framing::Length(4),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\nContent-Length: 4\r\nConnection: Keep-Alive\r\n\r\n",
            Framing::Length(4),
            true,
        ),
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            Framing::Upgrade,
            true,
        ),
        // Chunked in HTTP/1.0, or twice: read, but the connection is not kept.
        (
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
            chunked,
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunked,
            false,
        ),
    ];
    for (wire, framing, kept) in cases {
        assert_eq!(framed(wire), (framing, kept), "{wire:?}");
    }
}

#[test]
fn a_head_requests_response_has_no_body_whatever_its_length() {
    let h = head("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", true)
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Empty);
    assert_eq!(h.headers[header::CONTENT_LENGTH], "1234");
}

#[test]
fn interim_responses_are_read_past_and_the_rest_kept() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nX-A: b\r\nContent-Length: 2\r\n\r\nokHTTP/1.1"[..],
    );
    let h = parse(&mut buf, false).unwrap().unwrap();
    assert_eq!(h.status, StatusCode::CREATED);
    assert_eq!(h.headers["x-a"], "b");
    assert!(!h.headers.contains_key(header::LINK));
    assert_eq!(&buf[..], b"okHTTP/1.1");
}

#[test]
fn a_partial_head_waits_and_a_broken_one_fails() {
    assert!(
        head("HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none()
    );
    for wire in [
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n",
        "SMTP ready\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    ] {
        assert!(head(wire, false).is_err(), "{wire:?}");
    }
    let many = "X-A: v\r\n".repeat(MAX_HEADERS + 1);
    assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false).is_err());
}

#[test]
fn the_request_head_carries_our_framing_not_the_clients() {
    let (mut parts, ()) = hyper::Request::builder()
        .method("POST")
        .uri("/upload?x=1")
        .header("Host", "svc")
        .header("Content-Length", "999")
        .header("X-A", "1")
        .header("X-A", "2")
        .body(())
        .unwrap()
        .into_parts();
    let mut out = BytesMut::new();
    write_head(&parts, Sending::Length(10), &mut out);
    assert_eq!(
        &out[..],
        b"POST /upload?x=1 HTTP/1.1\r\nhost: svc\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 10\r\n\r\n"
    );
    parts.headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    out.clear();
    write_head(&parts, Sending::Chunked, &mut out);
    assert!(out.ends_with(b"x-a: 2\r\ntransfer-encoding: chunked\r\n\r\n"));
    out.clear();
    write_head(&parts, Sending::Nothing, &mut out);
    assert!(out.ends_with(b"x-a: 2\r\n\r\n"));
}

#[test]
fn numbers_are_written_as_http_wants_them() {
    for n in [0u64, 7, 10, 1234, u64::MAX] {
        assert_eq!(itoa(n, &mut [0; 20]), n.to_string().as_bytes());
    }
    for n in [0usize, 1, 15, 16, 4096, 0x00ab_cdef] {
        let mut out = BytesMut::new();
        chunk_prefix(n, &mut out);
        let want = if n == 0 {
            "0\r\n\r\n".to_owned()
        } else {
            format!("{n:x}\r\n")
        };
        assert_eq!(&out[..], want.as_bytes());
    }
}

#[test]
fn an_unusual_reason_phrase_is_kept() {
    let h = head(
        "HTTP/1.1 499 Client Closed Request\r\nContent-Length: 0\r\n\r\n",
        false,
    )
    .unwrap()
    .unwrap();
    assert_eq!(h.reason.unwrap().as_bytes(), b"Client Closed Request");
    let h = head("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false)
        .unwrap()
        .unwrap();
    assert!(h.reason.is_none(), "the usual phrase needs no extension");
}
