//! The socket under an HBONE connection's TLS, read in large chunks.
//!
//! rustls asks its transport for little at a time: at most 4 KiB beyond what it holds, and never
//! past the end of one record (16 KiB), so a bulk tunnel cost one `recv` per 4–16 KiB, each
//! with its own socket lock, receive-queue walk and window update. [`ReadAhead`] reads as much
//! as the socket holds into a buffer that grows with traffic (to 256 KiB, see
//! [`Buf`](super::copy)) and serves rustls from it. The buffer is let go whenever it is
//! drained after a read that did not fill it, so an idle connection holds none. Writes go
//! straight to the socket (rustls already writes its records with one vectored write).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::copy::Buf;

pub struct ReadAhead {
    io: TcpStream,
    buf: Buf,
}

impl ReadAhead {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: Buf::new(),
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    /// Bytes read from the socket and not yet handed out, with the memory held for them.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.buf.buf.len(), self.buf.buf.capacity())
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.buf.buf.is_empty() && ready!(this.buf.poll_read(&this.io, cx))? == 0 {
            this.buf.consumed();
            return Poll::Ready(Ok(()));
        }
        let n = out.remaining().min(this.buf.buf.len());
        out.put_slice(&this.buf.buf[..n]);
        this.buf.buf.advance(n);
        if this.buf.buf.is_empty() {
            this.buf.consumed();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (ReadAhead, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (ReadAhead::new(a.unwrap()), b.unwrap().0)
    }

    /// Small reads (as rustls makes them) see every byte in order, however the socket split
    /// them; one socket read serves many of them; EOF comes through; writes pass straight on.
    #[tokio::test]
    async fn serves_small_reads_from_large_socket_reads() {
        let (mut ahead, mut peer) = pair().await;
        let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            tokio::spawn(async move {
                for chunk in data.chunks(100_003) {
                    peer.write_all(chunk).await.unwrap();
                }
                peer.shutdown().await.unwrap();
                let mut back = Vec::new();
                peer.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        let mut served_from_memory = 0;
        loop {
            let before = ahead.held().0;
            let n = ahead.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= small.len());
            if before > 0 {
                served_from_memory += 1;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == data, "bytes differ");
        assert!(
            served_from_memory > data.len() / small.len() / 2,
            "most reads should not reach the socket ({served_from_memory})"
        );
        ahead.write_all(b"written through").await.unwrap();
        ahead.shutdown().await.unwrap();
        assert_eq!(sender.await.unwrap(), b"written through");
    }

    /// A drained read-ahead holds no memory while its connection waits.
    #[tokio::test]
    async fn holds_nothing_once_drained() {
        let (mut ahead, mut peer) = pair().await;
        peer.write_all(&[7; 1000]).await.unwrap();
        let mut small = [0u8; 100];
        ahead.read_exact(&mut small).await.unwrap();
        assert_eq!(ahead.held().0, 900, "the rest of the socket read is kept");
        let mut rest = [0u8; 900];
        ahead.read_exact(&mut rest).await.unwrap();
        assert_eq!(ahead.held(), (0, 0));
    }
}
