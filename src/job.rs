//! The unit of work the workers take ([`Job`]), and what happens after an
//! attempt ([`decide`]): a pure function of the attempt's result, so every
//! rule of the SPEC's "Delivery" section is tested without a relay.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::message::OutgoingMessage;
use crate::transport::{Delivered, DeliveryError, FailureKind, RecipientRefusal};

/// The facts of one attempt, as the transport reports them.
pub(crate) type AttemptOutcome = Result<Delivered, DeliveryError>;

/// What a `send_and_wait` caller learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WaitedOutcome {
    /// `sent` or `failed`.
    pub state: crate::status::State,
    /// Why it failed.
    pub error: Option<String>,
    /// The relay's reply code in the attempt, if there was one.
    pub smtp_code: Option<u16>,
}

/// A message on its way through the pool.
pub(crate) struct Job {
    /// The built message.
    pub message: Arc<OutgoingMessage>,
    /// Envelope recipients still to deliver to.
    pub recipients: Arc<[String]>,
    /// Attempts started so far.
    pub attempts: u32,
    /// Set for `/api/mail/v2`: one attempt, the outcome to the caller, not spooled.
    pub waiter: Option<Sender<WaitedOutcome>>,
    /// The shared store's claim on this job (a Redis stream entry), if any.
    pub ticket: Option<String>,
}

impl Job {
    /// A message to deliver to `recipients`, after `attempts` attempts.
    pub(crate) fn new(
        message: Arc<OutgoingMessage>,
        recipients: impl Into<Arc<[String]>>,
        attempts: u32,
    ) -> Job {
        Job {
            message,
            recipients: recipients.into(),
            attempts,
            waiter: None,
            ticket: None,
        }
    }

    /// The message's id.
    pub(crate) fn id(&self) -> &str {
        &self.message.id
    }

    /// Sent through `/api/mail/v2`: the caller waits, it is not spooled
    /// before it goes (its end is) and not retried.
    pub(crate) fn is_waited_for(&self) -> bool {
        self.waiter.is_some()
    }
}

/// When to try again: `base × 2^(attempts−1)`, capped at `max`, with
/// equal jitter; at most `max_attempts` attempts that reached the relay
/// (those that could not reach it or log in are retried regardless).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The wait before the next attempt after `attempts` attempts; `jitter`
    /// is a random number that picks a delay between half and all of the
    /// computed one (equal jitter).
    pub(crate) fn delay(&self, attempts: u32, jitter: u64) -> Duration {
        let exponent = attempts.saturating_sub(1).min(40);
        let full = if exponent > 31 {
            self.max
        } else {
            self.base.saturating_mul(1u32 << exponent).min(self.max)
        };
        let half = full / 2;
        let spread = (full - half).as_millis() as u64;
        half + Duration::from_millis(if spread == 0 {
            0
        } else {
            jitter % (spread + 1)
        })
    }
}

/// What happens to a message after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Every recipient has it, or was refused for good (those are listed).
    Sent { refused: Vec<RecipientRefusal> },
    /// Try again after `delay` for these recipients (the others are done).
    Retry {
        recipients: Vec<String>,
        refused: Vec<RecipientRefusal>,
        delay: Duration,
        error: String,
    },
    /// Give up: nobody more will get it.
    Failed {
        /// Recipients that did not get it.
        undelivered: Vec<String>,
        refused: Vec<RecipientRefusal>,
        error: String,
        /// Refused for good (a 5xx, or a message that cannot be sent),
        /// rather than out of attempts.
        permanent: bool,
    },
}

/// A message's attempts so far, the current one included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tries {
    /// Every attempt started: the backoff grows with these.
    pub started: u32,
    /// Those that reached the relay: `max_attempts` limits these.
    pub counted: u32,
}

impl Tries {
    /// `attempts` attempts, each of which reached the relay.
    #[cfg(test)]
    pub(crate) fn reached(attempts: u32) -> Tries {
        Tries {
            started: attempts,
            counted: attempts,
        }
    }
}

/// Decides what follows an attempt at `recipients` after `tries`.
/// `may_retry` is false for `/api/mail/v2` (one attempt).
pub(crate) fn decide(
    result: &AttemptOutcome,
    recipients: &[String],
    tries: Tries,
    policy: &RetryPolicy,
    may_retry: bool,
    jitter: u64,
) -> Decision {
    // The relay unreachable or refusing our login is not the message's
    // failure: it never uses up the attempts (the queue waits for the
    // relay), and later failures count only the attempts that reached it.
    let relay_down = matches!(result, Err(error) if error.before_transaction);
    let retry_allowed = may_retry && (tries.counted < policy.max_attempts || relay_down);
    let delay = policy.delay(tries.started, jitter);
    match result {
        Err(error) => {
            if error.kind == FailureKind::Transient && retry_allowed {
                Decision::Retry {
                    recipients: recipients.to_vec(),
                    refused: Vec::new(),
                    delay,
                    error: error.detail.clone(),
                }
            } else {
                Decision::Failed {
                    undelivered: recipients.to_vec(),
                    refused: Vec::new(),
                    error: error.detail.clone(),
                    permanent: error.kind == FailureKind::Permanent,
                }
            }
        }
        Ok(delivered) if delivered.deferred.is_empty() => {
            if delivered.accepted.is_empty() {
                Decision::Failed {
                    undelivered: recipients.to_vec(),
                    refused: delivered.refused.clone(),
                    error: format!("every recipient refused: {}", describe(&delivered.refused)),
                    permanent: true,
                }
            } else {
                Decision::Sent {
                    refused: delivered.refused.clone(),
                }
            }
        }
        Ok(delivered) => {
            let deferred: Vec<String> = delivered
                .deferred
                .iter()
                .map(|refusal| refusal.recipient.clone())
                .collect();
            let error = format!("recipients deferred: {}", describe(&delivered.deferred));
            if retry_allowed {
                Decision::Retry {
                    recipients: deferred,
                    refused: delivered.refused.clone(),
                    delay,
                    error,
                }
            } else {
                let mut undelivered = deferred;
                undelivered.extend(delivered.refused.iter().map(|r| r.recipient.clone()));
                Decision::Failed {
                    undelivered,
                    refused: delivered.refused.clone(),
                    error,
                    permanent: false,
                }
            }
        }
    }
}

/// `a@x: 550 5.1.1 no such user; b@y: …`
pub(crate) fn describe(refusals: &[RecipientRefusal]) -> String {
    refusals
        .iter()
        .map(|refusal| format!("{}: {}", refusal.recipient, refusal.reply))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::SmtpReply;

    const POLICY: RetryPolicy = RetryPolicy {
        base: Duration::from_millis(1000),
        max: Duration::from_millis(5000),
        max_attempts: 3,
    };

    fn recipients(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    fn refusal(recipient: &str, code: u16) -> RecipientRefusal {
        RecipientRefusal {
            recipient: recipient.into(),
            reply: SmtpReply {
                code,
                text: "no".into(),
            },
        }
    }

    fn delivered(accepted: &[&str], refused: &[&str], deferred: &[&str]) -> AttemptOutcome {
        Ok(Delivered {
            accepted: recipients(accepted),
            refused: refused.iter().map(|r| refusal(r, 550)).collect(),
            deferred: deferred.iter().map(|r| refusal(r, 452)).collect(),
            reply: None,
        })
    }

    /// What follows `result` at `attempts` attempts that all reached the
    /// relay, retries allowed, no jitter.
    fn after(result: &AttemptOutcome, recipients: &[String], attempts: u32) -> Decision {
        decide(
            result,
            recipients,
            Tries::reached(attempts),
            &POLICY,
            true,
            0,
        )
    }

    fn error(kind: FailureKind) -> AttemptOutcome {
        Err(match kind {
            FailureKind::Permanent => DeliveryError::permanent("550 no".into()),
            _ => DeliveryError::transient("421 try later".into(), false),
        })
    }

    /// An unreachable relay (or a refused login) never uses up the
    /// attempts, and only attempts that reached the relay count later;
    /// the backoff grows with every attempt started.
    #[test]
    fn attempts_that_never_reached_the_relay_are_not_counted() {
        let all = recipients(&["a"]);
        let unreachable: AttemptOutcome =
            Err(DeliveryError::transient("connection refused".into(), true).before_transaction());
        let many = Tries::reached(POLICY.max_attempts + 5);
        assert!(matches!(
            decide(&unreachable, &all, many, &POLICY, true, 0),
            Decision::Retry { .. }
        ));
        assert!(
            matches!(
                decide(&unreachable, &all, many, &POLICY, false, 0),
                Decision::Failed { .. }
            ),
            "/api/mail/v2 still makes one attempt"
        );
        // Ten attempts started, one of them reached the relay: a transient
        // refusal is retried, after the tenth attempt's delay.
        let after_outage = Tries {
            started: 10,
            counted: 1,
        };
        let Decision::Retry { delay, .. } = decide(
            &error(FailureKind::Transient),
            &all,
            after_outage,
            &POLICY,
            true,
            0,
        ) else {
            panic!("retried");
        };
        assert_eq!(delay, POLICY.delay(10, 0));
        assert!(matches!(
            after(&error(FailureKind::Transient), &all, POLICY.max_attempts),
            Decision::Failed {
                permanent: false,
                ..
            }
        ));
    }

    #[test]
    fn delay_doubles_with_equal_jitter_and_cap() {
        for jitter in [0, 1, 250, 499, 500, 4_000_000_007] {
            let first = POLICY.delay(1, jitter);
            assert!(first >= Duration::from_millis(500) && first <= POLICY.base);
            let third = POLICY.delay(3, jitter);
            assert!(third >= Duration::from_millis(2000) && third <= Duration::from_millis(4000));
            let capped = POLICY.delay(30, jitter);
            assert!(capped >= Duration::from_millis(2500) && capped <= POLICY.max);
            assert!(POLICY.delay(1000, jitter) <= POLICY.max);
        }
        assert_eq!(POLICY.delay(1, 0), Duration::from_millis(500));
        assert_eq!(POLICY.delay(1, 500), Duration::from_millis(1000));
    }

    #[test]
    fn all_accepted_is_sent_and_refusals_are_named() {
        let all = recipients(&["a", "b"]);
        assert_eq!(
            after(&delivered(&["a", "b"], &[], &[]), &all, 1),
            Decision::Sent { refused: vec![] }
        );
        assert_eq!(
            after(&delivered(&["a"], &["b"], &[]), &all, 1),
            Decision::Sent {
                refused: vec![refusal("b", 550)]
            }
        );
    }

    #[test]
    fn every_recipient_refused_fails_for_good() {
        let all = recipients(&["a", "b"]);
        let decision = after(&delivered(&[], &["a", "b"], &[]), &all, 1);
        let Decision::Failed {
            permanent, error, ..
        } = decision
        else {
            panic!("{decision:?}")
        };
        assert!(permanent);
        assert!(
            error.contains("a: 550 no") && error.contains("b: 550 no"),
            "{error}"
        );
    }

    #[test]
    fn deferred_recipients_are_retried_alone() {
        let all = recipients(&["a", "b", "c"]);
        let decision = after(&delivered(&["a"], &["b"], &["c"]), &all, 1);
        assert_eq!(
            decision,
            Decision::Retry {
                recipients: recipients(&["c"]),
                refused: vec![refusal("b", 550)],
                delay: Duration::from_millis(500),
                error: "recipients deferred: c: 452 no".into()
            }
        );
        // Out of attempts: failed, naming who did not get it.
        let decision = after(&delivered(&["a"], &["b"], &["c"]), &all, 3);
        let Decision::Failed {
            undelivered,
            permanent,
            ..
        } = decision
        else {
            panic!("{decision:?}")
        };
        assert_eq!(undelivered, recipients(&["c", "b"]));
        assert!(!permanent);
    }

    #[test]
    fn transient_errors_retry_until_attempts_run_out_permanent_ones_never() {
        let all = recipients(&["a"]);
        assert!(matches!(
            after(&error(FailureKind::Transient), &all, 2),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            after(&error(FailureKind::Transient), &all, 3),
            Decision::Failed {
                permanent: false,
                ..
            }
        ));
        assert!(matches!(
            after(&error(FailureKind::Permanent), &all, 1),
            Decision::Failed {
                permanent: true,
                ..
            }
        ));
        // /api/mail/v2: one attempt, the caller gets the outcome.
        assert!(matches!(
            decide(
                &error(FailureKind::Transient),
                &all,
                Tries::reached(1),
                &POLICY,
                false,
                0
            ),
            Decision::Failed { .. }
        ));
    }
}
