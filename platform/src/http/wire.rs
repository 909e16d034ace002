//! The contract's error body for the answers hyper writes by itself.
//!
//! hyper answers a request it cannot parse (bad bytes in the request line or
//! a header: 400; a URI over 65534 bytes: 414; too many or too large headers:
//! 431) on its own, with an empty body, and closes the connection; it offers
//! no hook to change that answer. [`ContractIo`] sits between hyper and the
//! socket and, when hyper writes such a head, sends instead the same status
//! with `content-type: application/json`, `connection: close` and the
//! contract body (API.md "Errors": every 4xx of the HTTP layer uses it).
//!
//! Recognising the head is safe because nothing of ours answers a 4xx with
//! an empty body (the router's catch-all gives every error a JSON body), and
//! the match is strict: `HTTP/1.1 4xx` first, only `content-length: 0`,
//! `date` and `connection` headers, and nothing after the head. A pipelined
//! request whose bad successor's answer shares one write with the previous
//! response is passed on as hyper wrote it (rare: only when the socket's send
//! buffer was full).

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::error::{ErrorBody, ErrorDetail, generic_error};

/// A connection's IO with hyper's automatic error answers rewritten.
#[derive(Debug)]
pub(crate) struct ContractIo<T> {
    inner: T,
    state: State,
}

#[derive(Debug)]
enum State {
    PassThrough,
    /// Sending `bytes` in place of the `consumed` bytes hyper asked to write.
    Replacing {
        bytes: Vec<u8>,
        written: usize,
        consumed: usize,
    },
    /// The replacement is out (driven by a flush); hyper has yet to be told
    /// its write of `consumed` bytes is done.
    Replaced {
        consumed: usize,
    },
}

impl<T> ContractIo<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            state: State::PassThrough,
        }
    }
}

impl<T: AsyncWrite + Unpin> ContractIo<T> {
    /// Writes what is left of a replacement; `Ready` once it is all out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let State::Replacing {
            bytes,
            written,
            consumed,
        } = &mut self.state
        {
            while *written < bytes.len() {
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            self.state = State::Replaced { consumed: *consumed };
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_checked(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if matches!(self.state, State::PassThrough) {
            let Some(bytes) = contract_answer(buf) else {
                return Pin::new(&mut self.inner).poll_write(cx, buf);
            };
            self.state = State::Replacing {
                bytes,
                written: 0,
                consumed: buf.len(),
            };
        }
        ready!(self.poll_replacement(cx))?;
        if let State::Replaced { consumed } = self.state {
            self.state = State::PassThrough;
            return Poll::Ready(Ok(consumed.min(buf.len())));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ContractIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ContractIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_checked(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // hyper queues a head in one buffer and a body in the next ones; an
        // automatic answer is a head alone.
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(first), None) = (non_empty.next(), non_empty.next())
            && (!matches!(this.state, State::PassThrough) || contract_answer(first).is_some())
        {
            return this.poll_write_checked(cx, first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The response to send instead of `written`, if `written` is exactly one of
/// hyper's automatic empty-bodied 4xx heads.
fn contract_answer(written: &[u8]) -> Option<Vec<u8>> {
    if !written.starts_with(b"HTTP/1.1 4") || !written.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(&written[..written.len() - 4]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = StatusCode::from_u16(status_line.get(9..12)?.parse().ok()?).ok()?;
    let mut empty_body = false;
    let mut kept = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("content-length") {
            empty_body = value.trim() == "0";
        } else if name.eq_ignore_ascii_case("date") {
            kept.push(line);
        } else if !name.eq_ignore_ascii_case("connection") {
            // A header hyper does not put on its own answers: ours, leave it.
            return None;
        }
    }
    if !empty_body {
        return None;
    }
    let (code, message) = match status {
        StatusCode::BAD_REQUEST => ("bad_request", "malformed request line or headers"),
        other => generic_error(other),
    };
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message: message.to_owned(),
        },
    })
    .ok()?;
    let mut answer = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for line in kept {
        answer.push_str(line);
        answer.push_str("\r\n");
    }
    answer.push_str("\r\n");
    let mut answer = answer.into_bytes();
    answer.extend_from_slice(&body);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn hypers_automatic_answers_get_the_contract_body() {
        for (head, code) in [
            ("HTTP/1.1 400 Bad Request", "bad_request"),
            ("HTTP/1.1 414 URI Too Long", "uri_too_long"),
            ("HTTP/1.1 431 Request Header Fields Too Large", "headers_too_large"),
        ] {
            let written = format!("{head}\r\ncontent-length: 0\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n");
            let answer = text(&contract_answer(written.as_bytes()).unwrap_or_default());
            assert!(answer.starts_with(&format!("{head}\r\n")), "{answer}");
            assert!(answer.contains("\r\ncontent-type: application/json\r\n"), "{answer}");
            assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
            assert!(answer.contains("\r\ndate: Mon, 01 Jan 2024"), "{answer}");
            let (_, body) = answer.split_once("\r\n\r\n").unwrap_or_default();
            let body: ErrorBody = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert_eq!(body.error.code, code);
        }
    }

    #[test]
    fn other_writes_pass_through() {
        for written in [
            // ours: a body follows
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
            // a head with a header hyper never adds to its own answers
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nwww-authenticate: Bearer\r\n\r\n",
            // body bytes
            "{\"error\":{}}",
        ] {
            assert_eq!(contract_answer(written.as_bytes()), None, "{written}");
        }
    }

    #[tokio::test]
    async fn the_replacement_is_written_whole_through_a_narrow_pipe() {
        // A 7-byte pipe makes every write partial.
        let (client, mut server) = tokio::io::duplex(7);
        let mut io = ContractIo::new(client);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let _ = server.read_to_end(&mut all).await;
            all
        });
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let mut rest: &[u8] = head;
        while !rest.is_empty() {
            let n = io.write(rest).await.unwrap_or(0);
            assert!(n > 0);
            rest = &rest[n..];
        }
        let _ = io.shutdown().await;
        drop(io);
        let all = text(&reader.await.unwrap_or_default());
        assert!(all.starts_with("HTTP/1.1 431 "), "{all}");
        assert!(
            all.ends_with(r#""code":"headers_too_large","message":"request headers too large"}}"#),
            "{all}"
        );
    }
}
