//! The sale page (issue 13): `GET /` and its two assets, plain HTML, CSS and JavaScript from
//! `web/` in the repository, compiled into the binary so the api serves them wherever it runs
//! (no build step, no directory to deploy beside it). The page uses only the public API.

use warp::filters::BoxedFilter;
use warp::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use warp::reply::Response;
use warp::{Filter, Reply};

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, content_type.parse().expect("static header"));
    // Same-origin scripts, styles and connections only: the page runs no inline code.
    h.insert(CONTENT_SECURITY_POLICY, "default-src 'self'; img-src 'self' data:".parse().expect("static header"));
    // Revalidate, so a new api version's page is picked up on reload.
    h.insert(CACHE_CONTROL, "no-cache".parse().expect("static header"));
    r
}

/// GET /, GET /app.js, GET /style.css
pub fn routes() -> BoxedFilter<(Response,)> {
    let index = warp::path::end().and(warp::get()).map(|| asset(INDEX, "text/html; charset=utf-8"));
    let app = warp::path!("app.js").and(warp::get()).map(|| asset(APP_JS, "text/javascript; charset=utf-8"));
    let style = warp::path!("style.css").and(warp::get()).map(|| asset(STYLE, "text/css; charset=utf-8"));
    index.or(app).unify().or(style).unify().boxed()
}
