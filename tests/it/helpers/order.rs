//! The order checker of the scale-out, chaos and cluster tests: every customer's messages
//! stored in the order sent (texts 0, 1, 2…), across all of the customer's conversations.

use std::collections::BTreeMap;

/// Asserts that exactly `customers` customers have customer messages stored, each exactly
/// `0..per_customer` in the order stored; `context` goes into the failure message (a seed...).
pub async fn assert_each_customer_in_order(
    pg: &tokio_postgres::Client,
    customers: usize,
    per_customer: usize,
    context: &str,
) {
    let rows = pg
        .query(
            "SELECT cu.external_id, m.body FROM messages m
             JOIN conversations v ON v.id = m.conversation_id JOIN customers cu ON cu.id = v.customer_id
             WHERE m.author = 'customer' ORDER BY cu.external_id, m.created_at, m.id",
            &[],
        )
        .await
        .unwrap();
    let mut texts: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for r in &rows {
        texts
            .entry(r.get(0))
            .or_default()
            .push(r.get::<_, String>(1).parse().unwrap());
    }
    assert_eq!(texts.len(), customers, "every customer {context}");
    for (customer, sequence) in &texts {
        assert_eq!(
            *sequence,
            (0..per_customer).collect::<Vec<_>>(),
            "customer {customer}'s messages in the order sent {context}"
        );
    }
}
