//! Health checks of a running process: a command, a TCP connect, an HTTP GET.
//!
//! The HTTP check is a hand-written HTTP/1.0 GET over a tokio `TcpStream`:
//! it sends one request and reads one status line, which is all a health
//! check needs; an HTTP client crate would add a large dependency tree for
//! those few lines. Only `http://` URLs are supported (the definition
//! checker enforces it).

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use understudy_core::spec::HealthCheck;

use crate::OpCtx;
use crate::spawn::{Exit, Launch, Spawned, show_argv};

/// Runs `check` once, bounded by `timeout`. `Err` says why it is unhealthy.
pub(crate) async fn run(check: &HealthCheck, launch: &Launch, ctx: &OpCtx, timeout: Duration) -> Result<(), String> {
    match check {
        HealthCheck::Command(argv) => command(argv, launch, ctx, timeout).await,
        HealthCheck::Tcp(addr) => tcp(addr, timeout).await,
        HealthCheck::Http(url) => http(url, timeout).await,
    }
}

/// Exit status 0 is healthy. On timeout the check's process group is killed.
async fn command(argv: &[String], launch: &Launch, ctx: &OpCtx, timeout: Duration) -> Result<(), String> {
    let shown = show_argv(argv);
    let mut cmd = launch.command(argv, ctx, &[("UNDERSTUDY_OP", "check")])?;
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let spawned = Spawned::spawn(&mut cmd).map_err(|e| format!("check `{shown}` cannot run: {e}"))?;
    let result = match spawned.wait_exit(timeout).await {
        Some(Exit::Code(0)) => Ok(()),
        Some(exit) => Err(format!("check `{shown}` {exit}")),
        None => {
            if let Err(e) = spawned.terminate(Signal::SIGKILL, Duration::ZERO).await {
                tracing::warn!("{e}");
            }
            Err(format!("check `{shown}` timed out after {timeout:?}"))
        }
    };
    spawned.reap().await;
    result
}

/// A TCP connect to `addr` (`host:port`) succeeds within `timeout`.
async fn tcp(addr: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp check {addr}: {e}")),
        Err(_) => Err(format!("tcp check {addr}: no connection within {timeout:?}")),
    }
}

/// The parts of an `http://` URL a GET needs.
#[derive(Debug, PartialEq, Eq)]
struct HttpTarget {
    /// `host:port` to connect to.
    connect: String,
    /// The `Host` header: the URL's authority as written.
    host: String,
    /// Path and query, at least `/`.
    path: String,
}

fn parse_url(url: &str) -> Result<HttpTarget, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("http check `{url}`: only http:// URLs are supported"));
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = path.split('#').next().unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.is_empty() {
        return Err(format!("http check `{url}`: no host"));
    }
    // A port is present when the last `:` comes after any IPv6 bracket.
    let has_port = match (authority.rfind(':'), authority.rfind(']')) {
        (Some(c), Some(b)) => c > b,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let connect = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(HttpTarget {
        connect,
        host: authority.to_owned(),
        path,
    })
}

/// The status code of an HTTP status line (`HTTP/1.1 200 OK`).
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// An HTTP/1.0 GET of `url` answers 2xx within `timeout`.
async fn http(url: &str, timeout: Duration) -> Result<(), String> {
    let target = parse_url(url)?;
    match tokio::time::timeout(timeout, http_status(&target)).await {
        Ok(Ok(code)) if (200..300).contains(&code) => Ok(()),
        Ok(Ok(code)) => Err(format!("http check {url}: status {code}")),
        Ok(Err(e)) => Err(format!("http check {url}: {e}")),
        Err(_) => Err(format!("http check {url}: no answer within {timeout:?}")),
    }
}

async fn http_status(target: &HttpTarget) -> Result<u16, String> {
    const MAX_STATUS_LINE: usize = 8192;
    let mut stream = TcpStream::connect(&target.connect).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: understudy\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        target.path, target.host
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..end]);
            let line = line.trim_end_matches('\r');
            return parse_status_line(line).ok_or_else(|| format!("not an HTTP status line: `{line}`"));
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err("status line too long".into());
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("cannot read answer: {e}"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "connection closed without an answer".into()
            } else {
                "connection closed in the status line".into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/health?x=1#frag").unwrap(),
            HttpTarget {
                connect: "127.0.0.1:8080".into(),
                host: "127.0.0.1:8080".into(),
                path: "/health?x=1".into()
            }
        );
        assert_eq!(
            parse_url("http://example.test").unwrap(),
            HttpTarget {
                connect: "example.test:80".into(),
                host: "example.test".into(),
                path: "/".into()
            }
        );
        assert_eq!(parse_url("http://[::1]/").unwrap().connect, "[::1]:80");
        assert_eq!(parse_url("http://[::1]:81/").unwrap().connect, "[::1]:81");
        assert_eq!(parse_url("http://host?q").unwrap().path, "/?q");
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line("HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status_line("HTTP/1.1 204"), Some(204));
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line("HTTP/1.1 20 OK"), None);
    }
}
