// The sign-in page: take the token out of the address bar and out of this history entry (so it is not
// left in the back list or shown over someone's shoulder), then go on to the labeling page unless the
// page asks the person to confirm a switch of user first.
(function () {
  "use strict";
  history.replaceState(null, "", "/");
  var next = document.getElementById("signin").dataset.continue;
  if (next) {
    location.replace(next);
  }
})();
