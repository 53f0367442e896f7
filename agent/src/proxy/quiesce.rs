//! A relay between a socket and a resumable HBONE stream that both ends of
//! the stream can quiesce together (see `transport::resume`): once told,
//! this side stops reading its socket (after writing all it read into the
//! stream), exchanges counts with the other end, and reads the stream up to
//! the other end's count. Every byte is then either delivered or still in
//! the socket's kernel buffer, and the stream holds nothing in flight: a
//! new stream can take over from there.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::idle::Activity;
use super::relay::{self, Ended, FinishedPeer, RelayOptions, Stopped};
use super::relay_buffer::RelayBuffer;

/// How long a quiesced stream may take to end cleanly.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The signals between the two directions of a relay and its quiesce.
struct Signals {
    /// Stop reading the socket (`false` again: the quiesce failed, go on).
    pause: watch::Sender<bool>,
    /// What the socket's direction wrote into the stream, while it stands.
    paused: watch::Sender<Option<u64>>,
    /// The other end's count: the stream's direction stops there.
    target: watch::Sender<Option<u64>>,
}

/// Where a relay starts on a stream.
#[derive(Clone, Copy, Default)]
pub struct Start<'a> {
    /// The directions that closed before (a relay resumed).
    pub ended: Ended,
    /// Bytes read from the socket already (behind an HTTP exchange that
    /// switched protocols), written into the stream first and counted as
    /// written by this relay, as the other end counts them read.
    pub head: &'a [u8],
}

impl From<Ended> for Start<'_> {
    fn from(ended: Ended) -> Self {
        Start { ended, head: &[] }
    }
}

/// Relays until both directions are closed, either side fails, nothing
/// moves for `how.idle`, or the relay is quiesced: `told` resolves, and
/// `exchange` gets the bytes this side wrote into the stream and returns
/// those the other end wrote (`None`: the quiesce failed, relay on). The
/// relay starts as `start` says. On failure the socket is reset.
/// What moved counts on this stream only; `sent` is socket to stream.
pub async fn relay<S, F>(
    socket: &TcpStream,
    stream: &mut S,
    how: RelayOptions,
    start: Start<'_>,
    told: impl Future<Output = ()>,
    exchange: impl FnOnce(u64) -> F,
) -> io::Result<Stopped>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = Option<u64>>,
{
    let activity = Activity::counting(how.live);
    let signals = Signals {
        pause: watch::Sender::new(false),
        paused: watch::Sender::new(None),
        target: watch::Sender::new(None),
    };
    let mut stream = FinishedPeer::new(stream);
    let (mut from_stream, mut to_stream) = tokio::io::split(&mut stream);
    let up = up(socket, &mut to_stream, &activity, start, &signals);
    let down = down(
        &mut from_stream,
        socket,
        &activity,
        start.ended.received,
        &signals,
    );
    let quiesce = async {
        told.await;
        signals.pause.send_replace(true);
        let mut paused = signals.paused.subscribe();
        let sent = match paused.wait_for(Option::is_some).await {
            Ok(sent) => sent.unwrap_or_default(),
            Err(_) => 0,
        };
        // Boxed: an exchange with the other end (6 KiB of state) happens
        // at a hand-over only, not in every open relay's future.
        match Box::pin(exchange(sent)).await {
            Some(theirs) => signals.target.send_replace(Some(theirs)),
            None => {
                signals.pause.send_replace(false);
                None
            }
        };
        std::future::pending::<()>().await
    };
    let both = activity.unless_idle(how.idle, async { tokio::try_join!(up, down) });
    let outcome = tokio::select! {
        copied = both => relay::stopped(copied),
        () = quiesce => unreachable!("a quiesce never ends the relay by itself"),
    };
    if outcome.is_err() {
        relay::reset(socket);
    }
    outcome
}

/// Socket to stream (`start.head` first): until EOF (`true`), or until
/// quiesced (`false`).
async fn up<S: AsyncWrite + Unpin>(
    from: &TcpStream,
    to: &mut WriteHalf<&mut S>,
    activity: &Activity,
    start: Start<'_>,
    signals: &Signals,
) -> io::Result<(u64, bool)> {
    let mut total = 0u64;
    if !start.head.is_empty() {
        to.write_all(start.head).await?;
        to.flush().await?;
        total = start.head.len() as u64;
        activity.moved(true, total);
    }
    if start.ended.sent {
        signals.paused.send_replace(Some(total));
        return Ok((total, true));
    }
    let mut pause = signals.pause.subscribe();
    let mut target = signals.target.subscribe();
    let mut buf = RelayBuffer::default();
    loop {
        // The only point where this direction stops: nothing read is unwritten.
        let told = tokio::select! {
            biased;
            told = pause.wait_for(|p| *p) => told.is_ok(),
            readable = from.readable() => {
                readable?;
                false
            }
        };
        if told {
            signals.paused.send_replace(Some(total));
            let quiesced = tokio::select! {
                done = target.wait_for(Option::is_some) => done.is_ok(),
                _ = pause.wait_for(|p| !*p) => false,
            };
            if quiesced {
                return Ok((total, false));
            }
            signals.paused.send_replace(None);
            continue;
        }
        // Written into the stream as far as it takes it at once.
        let read = poll_fn(|cx| {
            let write = |data: &[u8]| match Pin::new(&mut *to).poll_write(cx, data) {
                Poll::Ready(written) => written,
                Poll::Pending => Ok(0),
            };
            Poll::Ready(relay::read_socket(from, &mut buf, write))
        });
        let Poll::Ready(n) = read.await else {
            continue;
        };
        let n = n?;
        if n == 0 {
            to.shutdown().await?;
            signals.paused.send_replace(Some(total));
            return Ok((total, true));
        }
        to.write_all(buf.unwritten()).await?;
        buf.written();
        to.flush().await?;
        total += n as u64;
        activity.moved(true, n as u64);
    }
}

/// Stream to socket: until EOF (`true`), or until the other end's count
/// is reached once quiesced (`false`).
async fn down<S: AsyncRead + Unpin>(
    from: &mut ReadHalf<&mut S>,
    to: &TcpStream,
    activity: &Activity,
    closed: bool,
    signals: &Signals,
) -> io::Result<(u64, bool)> {
    if closed {
        return Ok((0, true));
    }
    let mut target = signals.target.subscribe();
    let mut total = 0u64;
    let mut buf = RelayBuffer::default();
    loop {
        // Written to the socket as far as it takes it at once.
        let read_stream = poll_fn(|cx| {
            let read = |space: &mut [u8]| {
                let mut space = ReadBuf::new(space);
                ready!(Pin::new(&mut *from).poll_read(cx, &mut space))?;
                Poll::Ready(Ok(space.filled().len()))
            };
            buf.relay_once(read, |data| to.try_write(data))
        });
        let read = tokio::select! {
            biased;
            _ = target.wait_for(|t| t.is_some_and(|t| total >= t)) => None,
            n = read_stream => Some(n?),
        };
        let Some(n) = read else {
            return Ok((total, false));
        };
        if n == 0 {
            relay::shutdown_write(to)?;
            return Ok((total, true));
        }
        relay::write_unwritten(to, &mut buf).await?;
        total += n as u64;
        activity.moved(false, n as u64);
    }
}

/// Which end of a quiesced stream ends it first.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// The end that asked for the quiesce: it closes, then waits for the
    /// other end's close.
    First,
    /// The other end: closes once the first end closed. Closing sooner
    /// could reach the first end before it knows the count to read up to,
    /// and look like the application's own EOF.
    Second,
}

/// Ends a quiesced stream cleanly (its end, and the other end's, which
/// comes after all it wrote), so neither end resets data the other has not
/// read yet.
pub async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ended: Ended,
    order: Closing,
) {
    let closing = async {
        if !ended.sent && order == Closing::First {
            stream.shutdown().await?;
        }
        let mut rest = [0u8; 512];
        let mut surplus = 0;
        loop {
            match stream.read(&mut rest).await? {
                0 => break,
                n => surplus += n,
            }
        }
        if !ended.sent && order == Closing::Second {
            stream.shutdown().await?;
        }
        Ok::<_, io::Error>(surplus)
    };
    match tokio::time::timeout(CLOSE_GRACE, closing).await {
        Ok(Ok(0)) => {}
        Ok(Ok(surplus)) => {
            log::warn!("{surplus} byte(s) past the count the peer gave were dropped")
        }
        Ok(Err(e)) => log::debug!("a quiesced stream ended with an error: {e}"),
        Err(_) => log::debug!("a quiesced stream was not closed by its peer in {CLOSE_GRACE:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap());
        let (a, b) = tokio::join!(a, listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn how() -> RelayOptions {
        RelayOptions {
            idle: Duration::from_secs(5),
            live: None,
        }
    }

    /// One end of a stream between two applications' relays, starting with
    /// `head`: quiesced when `told` resolves (the side that starts) or when
    /// the other end sends its count on `counts`.
    fn spawn_end<S>(
        socket: TcpStream,
        mut stream: S,
        head: &'static [u8],
        told: Option<oneshot::Receiver<()>>,
        counts: (oneshot::Sender<u64>, oneshot::Receiver<u64>),
    ) -> tokio::task::JoinHandle<(Stopped, TcpStream)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            let (to_other, from_other) = counts;
            let theirs = Mutex::new(None);
            let starts = told.is_some();
            let from_other = Mutex::new(Some(from_other));
            let take = || from_other.lock().unwrap().take().unwrap();
            let told_now = async {
                match told {
                    Some(told) => told.await.unwrap(),
                    None => {
                        let count = take().await.unwrap();
                        *theirs.lock().unwrap() = Some(count);
                    }
                }
            };
            let exchange = |sent| {
                to_other.send(sent).unwrap();
                async {
                    match starts {
                        true => take().await.ok(),
                        false => *theirs.lock().unwrap(),
                    }
                }
            };
            let start = Start {
                ended: Ended::default(),
                head,
            };
            let stopped = relay(&socket, &mut stream, how(), start, told_now, exchange)
                .await
                .unwrap();
            let order = if starts {
                Closing::First
            } else {
                Closing::Second
            };
            close(&mut stream, Ended::default(), order).await;
            (stopped, socket)
        })
    }

    /// Relays `socket` over `stream` for good (never quiesced).
    fn spawn_relay<S>(socket: TcpStream, mut stream: S, ended: Ended) -> tokio::task::JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            let never = std::future::pending();
            let exchange = |_| async { None };
            relay(&socket, &mut stream, how(), ended.into(), never, exchange)
                .await
                .unwrap();
        })
    }

    /// Both ends quiesce together while both applications write, each
    /// relay starting with its head from `heads` (what its socket sent
    /// behind an HTTP exchange); a new stream takes over and each
    /// application gets every byte once, in order.
    async fn quiesce_and_resume(heads: (&'static [u8], &'static [u8])) {
        let (mut app_a, relay_a) = pair().await;
        let (mut app_b, relay_b) = pair().await;
        let (near, far) = tokio::io::duplex(1024);
        let (told, told_rx) = oneshot::channel();
        let (a_to_b, from_a) = oneshot::channel();
        let (b_to_a, from_b) = oneshot::channel();
        let a = spawn_end(relay_a, near, heads.0, Some(told_rx), (a_to_b, from_b));
        let b = spawn_end(relay_b, far, heads.1, None, (b_to_a, from_a));
        app_a.write_all(b"one-a").await.unwrap();
        app_b.write_all(b"one-b").await.unwrap();
        told.send(()).unwrap();
        let ((stopped_a, relay_a), (stopped_b, relay_b)) = (a.await.unwrap(), b.await.unwrap());
        let (Stopped::Quiesced(moved_a, _), Stopped::Quiesced(moved_b, _)) = (stopped_a, stopped_b)
        else {
            panic!("not quiesced")
        };
        // What one end wrote into the stream, the other took out of it.
        assert_eq!(moved_a.sent, moved_b.received);
        assert_eq!(moved_b.sent, moved_a.received);
        // Written after the quiesce: waits in the sockets for the next stream.
        app_a.write_all(b"two-a").await.unwrap();
        app_b.write_all(b"two-b").await.unwrap();
        let (near, far) = tokio::io::duplex(1024);
        let _a = spawn_relay(relay_a, near, Ended::default());
        let _b = spawn_relay(relay_b, far, Ended::default());
        for (app, sent) in [
            (&mut app_b, [heads.0, b"one-atwo-a"]),
            (&mut app_a, [heads.1, b"one-btwo-b"]),
        ] {
            let mut got = vec![0u8; sent.concat().len()];
            app.read_exact(&mut got).await.unwrap();
            assert_eq!(got, sent.concat());
        }
    }

    #[tokio::test]
    async fn both_ends_quiesce_then_a_new_stream_loses_and_repeats_nothing() {
        quiesce_and_resume((b"", b"")).await;
    }

    /// What each relay's socket sent behind an HTTP exchange goes into the
    /// stream first and counts in the quiesce: delivered once, before the rest.
    #[tokio::test]
    async fn bytes_read_behind_an_http_exchange_go_first_and_are_counted() {
        quiesce_and_resume((b"head-a", b"hb")).await;
    }
}
