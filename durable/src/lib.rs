use worker::*;

#[durable_object]
pub struct KeyLimiter {
    state: State,
}

impl DurableObject for KeyLimiter {
    fn new(state: State, _env: Env) -> Self {
        Self { state }
    }

    async fn fetch(&self, _req: Request) -> Result<Response> {
        let sql = self.state.storage().sql();
        sql.exec("CREATE TABLE IF NOT EXISTS c (v INTEGER)", None)?;
        Response::ok("ok")
    }
}
