//! How a peer reaches its local service backends. The daemon dials TCP; the simulator injects
//! in-memory backends so that no kernel socket (and no wall-clock I/O) is involved.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to a backend.
pub trait BackendStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> BackendStream for T {}

/// A boxed backend stream.
pub type BoxedStream = Box<dyn BackendStream>;

/// The future returned by [`BackendConnector::connect`].
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>>;

/// Opens connections to local backends.
pub trait BackendConnector: Send + Sync + 'static {
    /// Connects to the backend of `service` at `addr`.
    fn connect(&self, service: &str, addr: SocketAddr) -> ConnectFuture;
}

/// The default: a TCP connection with `TCP_NODELAY`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpConnector;

impl BackendConnector for TcpConnector {
    fn connect(&self, _service: &str, addr: SocketAddr) -> ConnectFuture {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxedStream)
        })
    }
}
