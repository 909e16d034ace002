//! Publishing to JetStream with dedupe ids and trace headers.
//!
//! Measured on async-nats 0.51: more un-awaited ack futures than
//! `max_ack_inflight` make `send_publish` wait forever, and a dropped ack
//! future loses its error. So publishes are pipelined inside a window below
//! that limit, and every ack is awaited — also after a failure, so the caller
//! learns exactly which prefix of a batch is stored.

use std::collections::VecDeque;

use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishError, publish::PublishAck},
};
use bytes::Bytes;
use events::subjects::{MSG_ID, TRACEPARENT, TRACESTATE};
use platform::telemetry::TraceHeaders;

/// One message to publish. `msg_id` becomes `Nats-Msg-Id`: JetStream drops a
/// second message with the same id inside the stream's duplicate window.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Outgoing {
    pub fn new(subject: impl Into<String>, msg_id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            subject: subject.into(),
            msg_id: msg_id.into(),
            headers: HeaderMap::new(),
            payload: payload.into(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        self.headers.insert(name, value.as_ref());
        self
    }

    /// Carries a stored trace context (e.g. from event metadata).
    pub fn trace(mut self, trace: &TraceHeaders) -> Self {
        if let Some(traceparent) = &trace.traceparent {
            self.headers.insert(TRACEPARENT, traceparent.as_str());
        }
        if let Some(tracestate) = &trace.tracestate {
            self.headers.insert(TRACESTATE, tracestate.as_str());
        }
        self
    }

    /// Carries the current span's trace context.
    pub fn trace_current(mut self) -> Self {
        platform::telemetry::inject_nats(&mut self.headers);
        self
    }

    fn into_publish(self) -> (String, jetstream::message::PublishMessage) {
        let mut headers = self.headers;
        headers.insert(MSG_ID, self.msg_id.as_str());
        (
            self.subject,
            jetstream::message::PublishMessage::build()
                .payload(self.payload)
                .headers(headers),
        )
    }
}

/// The first message of a batch that was not stored, and why. Every message
/// before `index` was acknowledged by the server.
#[derive(Debug, thiserror::Error)]
#[error("publish #{index} failed: {source}")]
pub struct PublishFailure {
    pub index: usize,
    #[source]
    pub source: PublishError,
    pub acks: Vec<PublishAck>,
}

#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
    window: usize,
}

impl Publisher {
    /// `window` must stay below the context's `max_ack_inflight`.
    pub fn new(js: jetstream::Context, window: usize) -> Self {
        Self {
            js,
            window: window.max(1),
        }
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    pub async fn publish(&self, message: Outgoing) -> Result<PublishAck, PublishError> {
        let (subject, publish) = message.into_publish();
        self.js.send_publish(subject, publish).await?.await
    }

    /// Publishes `messages` in order, pipelined, and returns their acks in order.
    pub async fn publish_all(
        &self,
        messages: impl IntoIterator<Item = Outgoing>,
    ) -> Result<Vec<PublishAck>, PublishFailure> {
        let mut pending = VecDeque::with_capacity(self.window);
        let mut acks = Vec::new();
        let mut failure: Option<(usize, PublishError)> = None;
        for (index, message) in messages.into_iter().enumerate() {
            if pending.len() >= self.window {
                let Some((i, ack)) = pending.pop_front() else { break };
                if let Err(e) = settle(i, ack, &mut acks).await {
                    failure = Some(e);
                    break;
                }
            }
            let (subject, publish) = message.into_publish();
            match self.js.send_publish(subject, publish).await {
                Ok(ack) => pending.push_back((index, ack)),
                Err(error) => {
                    failure = Some((index, error));
                    break;
                }
            }
        }
        // Await every outstanding ack, even after a failure: a dropped ack
        // future would leave us guessing which messages were stored. All at
        // once: each ack's timeout runs from when it is awaited, so awaiting
        // them one by one after a broken connection took the timeout times
        // the window (20 s for four requests in the fault suite).
        let settled =
            futures::future::join_all(pending.into_iter().map(|(i, ack)| async move { (i, ack.await) })).await;
        for (i, result) in settled {
            let outcome = match result {
                Ok(ack) if acks.len() == i => {
                    acks.push(ack);
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(error) => Err((i, error)),
            };
            if let Err(e) = outcome {
                // keep the lowest failed index: everything before it is stored
                if failure.as_ref().is_none_or(|(first, _)| e.0 < *first) {
                    failure = Some(e);
                }
            }
        }
        match failure {
            None => Ok(acks),
            Some((index, source)) => {
                acks.truncate(index);
                Err(PublishFailure { index, source, acks })
            }
        }
    }
}

async fn settle(
    index: usize,
    ack: jetstream::context::PublishAckFuture,
    acks: &mut Vec<PublishAck>,
) -> Result<(), (usize, PublishError)> {
    match ack.await {
        // acks arrive in order until the first failure, so push keeps indexes aligned
        Ok(ack) if acks.len() == index => {
            acks.push(ack);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(error) => Err((index, error)),
    }
}
