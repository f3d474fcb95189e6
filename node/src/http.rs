//! A minimal HTTP/1.1 GET client for `meshd status` (loopback admin API only; no TLS, no
//! redirects). Keeps the CLI free of a full HTTP client stack.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response accepted.
const MAX_RESPONSE: usize = 16 << 20;

/// GETs `path` from `addr` and returns the body of a 200 response.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (code, body) = request(addr, "GET", path, None, None).await?;
    if code != 200 {
        bail!("GET {path} from {addr}: HTTP {code}: {body}");
    }
    Ok(body)
}

/// Sends one request (optional bearer token and JSON body) and returns status and body.
/// The bearer token is never part of an error message.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot reach the admin API at {addr}"))?;
        let mut req = zeroize::Zeroizing::new(format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n"
        ));
        if let Some(t) = bearer {
            req.push_str("Authorization: Bearer ");
            req.push_str(t);
            req.push_str("\r\n");
        }
        match json {
            Some(b) => {
                req.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                ));
                req.push_str(b);
            }
            None => req.push_str("Content-Length: 0\r\n\r\n"),
        }
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        (&mut s)
            .take(MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut buf)
            .await?;
        if buf.len() > MAX_RESPONSE {
            bail!("response from {addr}{path} too large");
        }
        parse_response(&buf).with_context(|| format!("{method} {path} from {addr}"))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("admin API at {addr} did not answer in time"))?
}

fn parse_response(buf: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response");
    };
    let status_line = head.lines().next().unwrap_or("");
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((code, body.to_owned()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            bail!("malformed chunked body");
        };
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok((code, out));
        }
        if after.len() < size {
            bail!("truncated chunk");
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
        assert_eq!(parse_response(plain).unwrap(), (200, "[]".to_string()));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n[1\r\n1\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "[1]".to_string()));
        assert_eq!(
            parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nno")
                .unwrap()
                .0,
            404
        );
        assert!(parse_response(b"garbage").is_err());
    }
}
