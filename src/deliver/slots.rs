//! Request slots at one receiver, shared by the endpoints of one delivery thread. A slot
//! set free goes to the waiter whose next event is the oldest, so a backlog spread over
//! many endpoints goes out in about the order it came in: the oldest click waiting at a
//! receiver is the next to go, and the delivery thread reads the log's events in order,
//! mostly from the batch it read last, where first come, first served had it look up and
//! read a batch for nearly every click. It must not do I/O or know about endpoints: an
//! order is only a number.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// A receiver's slots on one delivery thread's shared client.
pub struct ReceiverSlots {
    state: Mutex<State>,
}

struct State {
    free: usize,
    waiting: BinaryHeap<Waiter>,
    next_arrival: u64,
}

/// One waiter in line: the heap's top is the lowest (order, arrival).
struct Waiter {
    order: u64,
    arrival: u64,
    handoff: oneshot::Sender<ReceiverSlot>,
}

impl Waiter {
    fn place(&self) -> (u64, u64) {
        (self.order, self.arrival)
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> Ordering {
        other.place().cmp(&self.place())
    }
}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.place() == other.place()
    }
}

impl Eq for Waiter {}

/// One request slot, given back (to the next waiter, if any) when dropped.
pub struct ReceiverSlot {
    slots: Arc<ReceiverSlots>,
}

impl ReceiverSlots {
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(ReceiverSlots {
            state: Mutex::new(State {
                free: slots,
                waiting: BinaryHeap::new(),
                next_arrival: 0,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; its counts stay whole between calls.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot if one is free now. None is free while anyone waits: a freed slot goes
    /// straight to a waiter.
    pub fn try_take(self: &Arc<Self>) -> Option<ReceiverSlot> {
        let mut state = self.state();
        if state.free == 0 {
            return None;
        }
        state.free -= 1;
        Some(ReceiverSlot { slots: self.clone() })
    }

    /// A slot once one is free; among waiters the lowest `order` goes first, and equal
    /// orders in arrival. `None` never happens while the slots exist.
    pub async fn take(self: Arc<Self>, order: u64) -> Option<ReceiverSlot> {
        let handed = {
            let mut state = self.state();
            if state.free > 0 {
                state.free -= 1;
                None
            } else {
                let arrival = state.next_arrival;
                state.next_arrival += 1;
                let (handoff, rx) = oneshot::channel();
                state.waiting.push(Waiter {
                    order,
                    arrival,
                    handoff,
                });
                Some(rx)
            }
        };
        match handed {
            None => Some(ReceiverSlot { slots: self }),
            Some(rx) => rx.await.ok(),
        }
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.state().free
    }
}

impl Drop for ReceiverSlot {
    fn drop(&mut self) {
        let next = {
            let mut state = self.slots.state();
            loop {
                let Some(waiter) = state.waiting.pop() else {
                    state.free += 1;
                    break None;
                };
                // A waiter that gave up left its sender closed.
                if !waiter.handoff.is_closed() {
                    break Some(waiter.handoff);
                }
            }
        };
        if let Some(tx) = next {
            // A waiter gone between the check and the send drops the slot it was sent,
            // which hands it on to the next.
            let _ = tx.send(ReceiverSlot {
                slots: self.slots.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_lowest_order_waiting() {
        let slots = ReceiverSlots::new(1);
        let held = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for order in [30u64, 10, 20, 10] {
            let (slots, tx) = (slots.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = slots.take(order).await.unwrap();
                tx.send(order).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(rx.recv().await.unwrap());
        }
        assert_eq!(got, vec![10, 10, 20, 30]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(slots.free(), 1, "every slot came back");
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_is_passed_over() {
        let slots = ReceiverSlots::new(1);
        let held = slots.try_take().unwrap();
        let gave_up = tokio::spawn(slots.clone().take(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
        gave_up.abort();
        let _ = gave_up.await;
        let waiting = tokio::spawn(slots.clone().take(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        let slot = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the slot went to the one still waiting")
            .unwrap();
        assert!(slot.is_some());
        drop(slot);
        assert_eq!(slots.free(), 1);
    }
}
