//! A Postgres database of the test's own, made (and migrated) on the server of
//! `FL_TEST_PG_URL` and dropped with the test, and counts read from it.

use uuid::Uuid;

/// A fresh database, dropped with the test.
pub struct TestDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let admin_url = std::env::var("FL_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
        Self::create_on(&admin_url).await
    }

    /// A fresh database on the server of `admin_url`.
    pub async fn create_on(admin_url: &str) -> Self {
        let admin_url = admin_url.to_owned();
        let name = format!("fl_test_{}", Uuid::new_v4().simple());
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .expect("FL_TEST_PG_URL must be a URL ending in /<database>");
        let url = format!("{base}/{name}");
        firstline_shared::db::create_database_if_missing(&url)
            .await
            .expect("create the test database (is Postgres running? scripts/test starts it)");
        firstline_shared::db::migrate(&url).await.expect("migrate");
        TestDb {
            admin_url,
            name,
            url,
        }
    }

    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Reads one `i64` (a count) from a query.
pub async fn count(
    pg: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    pg.query_one(sql, params).await.unwrap().get(0)
}
